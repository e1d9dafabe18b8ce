"""Elastic training on a multi-node Ray cluster on this machine: a preempted node, a smaller group, the
node back, a group grown again; against the uninterrupted run.

    python benchmarks/elastic.py                        # ~10 min on 2 cores, alone
    python benchmarks/elastic.py --no-notice            # the node is lost without a preemption notice
    python benchmarks/elastic.py --plot docs/elastic_loss.png --json elastic.json

The cluster of ``benchmarks/fault_recovery.py``: a head (1 CPU: Ray Data, the Train controller) and two
1-CPU nodes labelled ``trainer``, real raylets started by ``ray.cluster_utils.Cluster``. Two runs of
``pipelines/train.py`` as ``ray job submit`` runs them (RAY_ADDRESS set), one after the other:

1. the reference: a fixed 2-worker run in global data order;
2. the elastic run, ``--train.num_workers=1-2``. Once step ``--at`` is logged, the node of one of its
   workers gets a preemption notice (``ray drain-node`` with a ``--deadline-s`` deadline, what the
   autoscaler or a pod's preStop hook sends) and is removed once the checkpoint answering it is
   registered (with ``--no-notice``, removed at once); ``--regrow-after-s`` later a node comes back.

Per-step wall time, loss and worker count come from the elastic run's MLflow metrics. Printed: the
table of docs/benchmarks.md (notice to checkpoint, node loss to the first step on the smaller group,
steps lost, node back to the first step on the grown group) and the largest loss difference to the
reference over all steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fault_recovery import NODE, train_cmd, wait_for_step


def logged(db: Path, name: str) -> list[tuple[float, int, str, float]]:
    """[(wall time s, step, key, value)] of the run's loss and worker count, every logged step (a step
    trained again after a restart is logged again), in time order."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            "select m.timestamp, m.step, m.key, m.value from metrics m join tags t on m.run_uuid = t.run_uuid "
            "where t.key = 'selfe.train_run_name' and t.value = ? and m.key in ('loss', 'workers')", (name,)).fetchall()
    finally:
        con.close()
    return sorted((ts / 1000, step, key, value) for ts, step, key, value in rows)


def history(db: Path, name: str) -> dict[int, dict]:
    """{step: {"t": wall time s, "loss": ..., "workers": ...}}, the last value logged for each step."""
    out: dict[int, dict] = {}
    for t, step, key, value in logged(db, name):
        out.setdefault(step, {}).update({key: value, "t": t})
    return out


def all_logged(db: Path, name: str) -> list[tuple[float, int, float]]:
    """[(wall time s, step, workers)] of every logged step, restarts included, in time order."""
    return [(t, step, value) for t, step, key, value in logged(db, name) if key == "workers"]


def registered_steps(run_dir: Path) -> list[int]:
    try:
        results = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [int(r["metrics"]["step"]) for r in results]


def command(work: Path, name: str, steps: int, every: int, workers: str, *extra: str) -> list[str]:
    base = [a for a in train_cmd(work, name, steps, every) if not a.startswith("--train.num_workers=")]
    return [*base, f"--train.num_workers={workers}", "--train.data_order=global", *extra]


def elastic_run(cluster, nodes: list, work: Path, args) -> dict:
    from ray.util.state import list_actors

    name, db = "elastic", work / "mlflow.db"
    cmd = command(work, name, args.steps, args.checkpoint_every, "1-2", "--train.resize_interval_s=5",
                  "--train.preemption_check_every=1")
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=(work / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
    wait_for_step(db, name, args.at, proc)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    index = next(i for i, n in enumerate(nodes) if n.node_id in {a.node_id for a in workers})
    out: dict = {"notice": not args.no_notice}
    if not args.no_notice:
        t_notice = time.time()
        subprocess.run(["ray", "drain-node", f"--address={cluster.address}", f"--node-id={nodes[index].node_id}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (benchmark)",
                        f"--deadline-remaining-seconds={args.deadline_s}"], check=True, capture_output=True, timeout=60)
        deadline = time.time() + args.deadline_s
        while time.time() < deadline and not [s for s in registered_steps(work / "ray" / name) if s % args.checkpoint_every]:
            time.sleep(0.2)
        answered = [s for s in registered_steps(work / "ray" / name) if s % args.checkpoint_every]
        out["notice_checkpoint_step"] = answered[0] if answered else None
        out["notice_to_checkpoint_s"] = round(time.time() - t_notice, 1) if answered else None
    t_loss = time.time()
    cluster.remove_node(nodes[index])
    while not [s for t, s, w in all_logged(db, name) if t > t_loss and w == 1]:
        if proc.poll() is not None:
            raise RuntimeError(f"the elastic run exited with {proc.returncode} before training on 1 worker")
        time.sleep(0.5)
    time.sleep(args.regrow_after_s)
    t_back = time.time()
    nodes[index] = cluster.add_node(**NODE)
    rc = proc.wait(1800)
    logged = all_logged(db, name)
    before = [s for t, s, w in logged if t < t_loss]
    alone = [(t, s) for t, s, w in logged if t >= t_loss and w == 1]
    grown = [(t, s) for t, s, w in logged if t >= t_back and w == 2]
    out.update(
        exit_code=rc, step_at_loss=max(before), first_alone=alone[0][1], loss_to_alone_s=round(alone[0][0] - t_loss, 1),
        steps_lost=max(before) - (alone[0][1] - 1), steps_alone=len({s for _, s in alone}),
        first_grown=grown[0][1] if grown else None,
        back_to_grown_s=round(grown[0][0] - t_back, 1) if grown else None,
        steps_regrown_twice=(max(s for t, s in alone if t < grown[0][0]) - (grown[0][1] - 1)) if grown else None)
    return out


def plot(path: str, reference: dict, elastic: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = sorted(reference)
    ax.plot(steps, [reference[s]["loss"] for s in steps], label="fixed 2 workers", lw=2.5, alpha=0.5)
    ax.plot(sorted(elastic), [elastic[s]["loss"] for s in sorted(elastic)], "--", label="elastic 1-2 workers", lw=1.2)
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Self-E tiny, global batch 16: the elastic run's losses against the fixed run's")
    bx.step(sorted(elastic), [elastic[s]["workers"] for s in sorted(elastic)], where="post")
    bx.set_ylabel("workers")
    bx.set_xlabel("step (the last value logged for it)")
    bx.set_yticks([1, 2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--at", type=int, default=25, help="the notice (or the loss) once this step is logged")
    ap.add_argument("--deadline-s", type=int, default=60, help="the notice's deadline")
    ap.add_argument("--no-notice", action="store_true", help="lose the node without a preemption notice")
    ap.add_argument("--regrow-after-s", type=float, default=15.0, help="node back this long after the first "
                    "step on one worker")
    ap.add_argument("--plot", help="write the loss curves here (PNG)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--work", help="folder for the runs (default: a new temporary folder, kept)")
    args = ap.parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(**NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    work = Path(args.work or tempfile.mkdtemp(prefix="selfe-elastic-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[elastic] runs and logs in {work}", flush=True)
    try:
        t0 = time.time()
        ref_cmd = command(work, "fixed", args.steps, args.checkpoint_every, "2")
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        rc = subprocess.run(ref_cmd, env=env, cwd=work, stdout=(work / "fixed.log").open("w"),
                            stderr=subprocess.STDOUT).returncode
        print(f"[elastic] reference run: rc {rc}, {time.time() - t0:.0f} s", flush=True)
        t0 = time.time()
        result = elastic_run(cluster, nodes, work, args)
        result["elastic_job_s"] = round(time.time() - t0, 1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    reference, elastic = history(work / "mlflow.db", "fixed"), history(work / "mlflow.db", "elastic")
    common = sorted(set(reference) & set(elastic))
    result["steps_compared"] = len(common)
    result["max_rel_loss_diff"] = max(abs(elastic[s]["loss"] - reference[s]["loss"]) / abs(reference[s]["loss"])
                                      for s in common)
    print(json.dumps(result), flush=True)
    print("\n| notice | notice → checkpoint | step at loss | resumed at | steps lost | loss → first step on 1 | "
          "steps on 1 | node back → first step on 2 | steps redone at growth | max rel. loss diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {'yes' if result['notice'] else 'no'} | "
          f"{result.get('notice_to_checkpoint_s', '—')} s (step {result.get('notice_checkpoint_step', '—')}) | "
          f"{result['step_at_loss']} | {result['first_alone'] - 1} | {result['steps_lost']} | "
          f"{result['loss_to_alone_s']} s | {result['steps_alone']} | {result['back_to_grown_s']} s | "
          f"{result['steps_regrown_twice']} | {result['max_rel_loss_diff']:.1e} |")
    if args.plot:
        plot(args.plot, reference, elastic)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
