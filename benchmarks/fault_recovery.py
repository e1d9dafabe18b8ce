"""Time to recover from the faults clusters produce, measured on a multi-node Ray cluster on this machine.

    python benchmarks/fault_recovery.py                     # all faults, ~10-15 min on 2 cores
    python benchmarks/fault_recovery.py --faults worker_kill,node_loss --steps 60

A head node (1 CPU: Train controller, Ray Data) and two 1-CPU nodes labelled ``trainer`` run
``pipelines/train.py`` exactly as ``ray job submit`` would (RAY_ADDRESS set, a 2-worker FSDP run
pinned to the trainer nodes, checkpoints every ``--checkpoint-every`` steps). Mid-run, after a
checkpoint, one fault is injected:

- ``worker_kill``: SIGKILL of one RayTrainWorker process;
- ``node_loss``: a trainer node removed (its raylet and workers die), a replacement added as an
  autoscaler would;
- ``driver_kill``: SIGKILL of the job driver (the Train controller goes with it), then the same
  command again with the same run name;
- ``corrupt_checkpoint``: SIGKILL of the job driver, one shard of the latest registered checkpoint
  truncated, then the same command again (it must fall back to the older checkpoint);
- ``preprocess_kill``: SIGKILL of ``pipelines/preprocess.py`` once it writes rows, then a rerun;
- ``mlflow_outage``: the run logs to an ``mlflow server``, which is stopped mid-run for
  ``--outage-s`` seconds and started again on the same port and database.

The per-step timeline comes from the MLflow run (each logged step carries the worker's wall-clock
timestamp). Printed per fault: the last step logged before the fault, the step training resumed
from, the steps lost (done twice), the time to recover (fault -> first new step logged) and the
time from the fault to the job's end, plus whether every checkpoint on disk is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NODE = {"num_cpus": 1, "resources": {"trainer": 1}}
TRAIN_FAULTS = ("worker_kill", "node_loss", "driver_kill", "corrupt_checkpoint")
ALL_FAULTS = (*TRAIN_FAULTS, "preprocess_kill", "mlflow_outage")


def train_cmd(work: Path, name: str, steps: int, every: int) -> list[str]:
    return [sys.executable, str(REPO / "pipelines/train.py"), "--data.num_samples=600", f"--train.steps={steps}",
            f"--train.checkpoint_every={every}", "--train.log_every=1", "--train.batch_size=16",
            "--train.num_workers=2", "--train.cpus_per_worker=0.5", "--train.threads_per_worker=1",
            "--train.worker_resources.trainer=1", "--train.max_failures=3", f"--train.run_name={name}",
            "--eval.steps=1", "--eval.max_prompts=1", "--eval.untrained_reference=false",
            f"--train.storage_path={work / 'ray'}", f"--data.cache_root={work / 'cache'}",
            f"--tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", f"--out={work / 'out'}"]


def step_history(db: Path, name: str, key: str = "loss") -> list[tuple[float, int]]:
    """[(wall time s, step)] of the run's logged ``key``, read straight from the SQLite store.

    Read-only SQL, not an MlflowClient: a client opening the database while the job's driver creates
    it would race it through MLflow's schema migrations."""
    import sqlite3

    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            "select m.timestamp, m.step from metrics m join tags t on m.run_uuid = t.run_uuid "
            "where t.key = 'selfe.train_run_name' and t.value = ? and m.key = ?", (name, key)).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        rows = []
    finally:
        con.close()
    return sorted((ts / 1000, step) for ts, step in rows)


def wait_for_step(db: Path, name: str, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = step_history(db, name)
        if hist and max(s for _, s in hist) >= step:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"training exited with {proc.returncode} before step {step}")
        time.sleep(0.5)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def checkpoints_complete(run_dir: Path, model_cfg) -> tuple[bool, list[int]]:
    from selfe.core.model import build_model
    from selfe.train.checkpoint import is_complete, load_weights

    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    ok = bool(ckpts) and all(is_complete(p) for p in ckpts)
    steps = sorted(load_weights(p, build_model(model_cfg))["step"] for p in ckpts if is_complete(p))
    return ok, steps


def run_train_fault(fault: str, cluster, nodes: list, work: Path, steps: int, every: int, at: int) -> dict:
    from ray.util.state import list_actors

    from selfe.config import load_config

    name = f"fault-{fault}"
    cmd = train_cmd(work, name, steps, every)
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    log = (work / f"{name}.log").open("w")
    t_start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    db = work / "mlflow.db"
    wait_for_step(db, name, at, proc)
    extra: dict = {}
    t_fault = time.time()
    if fault == "worker_kill":
        (victim,) = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])][:1]
        os.kill(victim.pid, signal.SIGKILL)
    elif fault == "node_loss":
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        node_ids = {a.node_id for a in workers}
        (index,) = [i for i, n in enumerate(nodes) if n.node_id in node_ids][:1]
        cluster.remove_node(nodes[index])
        nodes[index] = cluster.add_node(**NODE)  # the autoscaler's replacement
        extra["replacement_added_s"] = round(time.time() - t_fault, 1)
    elif fault in ("driver_kill", "corrupt_checkpoint"):
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if fault == "corrupt_checkpoint":
            run_dir = work / "ray" / name
            names = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
            shard = sorted((run_dir / names[-1]["checkpoint_dir_name"]).glob("*.distcp"))[0]
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            extra["corrupted"] = names[-1]["metrics"]["step"]
        proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)  # resubmitted
    rc = proc.wait(900)
    t_end = time.time()
    hist = step_history(db, name)
    before = [s for t, s in hist if t < t_fault]
    after = [(t, s) for t, s in hist if t >= t_fault]
    cfg = load_config(overrides=[a for a in cmd[2:] if not a.startswith("--out=")])
    ok, ckpt_steps = checkpoints_complete(work / "ray" / name, cfg.model)
    first_t, first_s = after[0] if after else (float("nan"), -1)
    logged_steps = sorted({s for _, s in hist})
    return {
        "fault": fault, "exit_code": rc, "step_at_fault": max(before) if before else 0,
        "resumed_from": first_s - 1, "steps_lost": (max(before) if before else 0) - (first_s - 1),
        "recover_s": round(first_t - t_fault, 1), "fault_to_end_s": round(t_end - t_fault, 1),
        "job_s": round(t_end - t_start, 1), "final_step": max(logged_steps) if logged_steps else 0,
        "every_step_logged": logged_steps == list(range(1, steps + 1)),
        "checkpoints_complete": ok, "checkpoint_steps": ckpt_steps, **extra,
    }


def run_preprocess_fault(cluster, work: Path, samples: int) -> dict:
    import pyarrow.parquet as pq

    def rows(root: Path) -> list[str]:
        (cache,) = [p for p in root.iterdir() if (p / "manifest.json").exists()]
        files = json.loads((cache / "manifest.json").read_text())["files"]
        table = pq.read_table([str(cache / f) for f in files], columns=["caption", "spec"])
        return sorted(c + "|" + s for c, s in zip(table["caption"].to_pylist(), table["spec"].to_pylist()))

    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    base = [sys.executable, str(REPO / "pipelines/preprocess.py"), f"--data.num_samples={samples}", "--data.seed=7"]
    t0 = time.time()
    subprocess.run([*base, f"--out={work / 'ref'}"], env=env, check=True, capture_output=True, timeout=900)
    clean_s = time.time() - t0
    t_start = time.time()
    killed = subprocess.Popen([*base, f"--out={work / 'cut'}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    while not list((work / "cut").glob("*/builds/*/data/*.parquet")):
        if killed.poll() is not None:
            raise RuntimeError("preprocessing finished before it could be killed; raise --preprocess-samples")
        time.sleep(0.2)
    t_fault = time.time()
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    partial = len(list((work / "cut").glob("*/builds/*/data/*.parquet")))
    rerun = subprocess.run([*base, f"--out={work / 'cut'}"], env=env, capture_output=True, text=True, timeout=900)
    t_end = time.time()
    ref, got = rows(work / "ref"), rows(work / "cut")
    return {"fault": "preprocess_kill", "exit_code": rerun.returncode, "clean_run_s": round(clean_s, 1),
            "killed_after_s": round(t_fault - t_start, 1), "partial_files_at_kill": partial,
            "rerun_s": round(t_end - t_fault, 1), "rows": len(got), "rows_expected": len(ref),
            "identical_rows": got == ref}  # as multisets: the world itself repeats some scenes


def mlflow_server(db: Path, port: int) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
                             (db.parent / "artifacts").as_uri(), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("mlflow server did not start in 120 s")


def run_mlflow_outage(cluster, work: Path, steps: int, every: int, at: int, outage_s: float) -> dict:
    """Training keeps going while the tracking server is down; the backlog arrives once it is back."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = work / "mlflow.db"
    name = "fault-mlflow_outage"
    cmd = [a if not a.startswith("--tracking.tracking_uri=") else f"--tracking.tracking_uri=http://127.0.0.1:{port}"
           for a in train_cmd(work, name, steps, every)]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    server = mlflow_server(db, port)
    log = (work / f"{name}.log").open("w")
    t_start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(db, name, at, proc)
        server.terminate()
        server.wait(30)
        t_down = time.time()
        time.sleep(outage_s)
        during = [s for t, s in step_history(db, name) if t >= t_down]  # nothing can have arrived
        server = mlflow_server(db, port)
        t_up = time.time()
        caught_up = None
        while proc.poll() is None or caught_up is None:
            hist = step_history(db, name)
            late = [s for t, s in hist if t_down <= t < t_up]  # logged (by the worker) while the server was down
            if caught_up is None and late:
                caught_up = time.time() - t_up
            if proc.poll() is not None and caught_up is None:
                break
            time.sleep(0.5)
        rc = proc.wait(900)
    finally:
        server.terminate()
    hist = step_history(db, name)
    steps_down = sorted({s for t, s in hist if t_down <= t < t_up})
    logged = sorted({s for _, s in hist})
    return {"fault": "mlflow_outage", "exit_code": rc, "outage_s": round(t_up - t_down, 1),
            "steps_trained_while_down": len(steps_down), "arrived_during_outage": len(during),
            "backlog_delivered_s_after_restart": None if caught_up is None else round(caught_up, 1),
            "every_step_logged": logged == list(range(1, steps + 1)), "job_s": round(time.time() - t_start, 1)}


def print_table(results: list[dict], steps: int) -> None:
    """The results as the markdown table of docs/benchmarks.md."""
    print("\n| fault | step at fault | resumed from | steps lost | time to recover | fault → job end | "
          "finished | checkpoints complete |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['fault']} | failed: {r['error']} |")
        elif r["fault"] == "mlflow_outage":
            print(f"| mlflow_outage | — | — | 0 (steps trained while down: {r['steps_trained_while_down']}; every step "
                  f"logged: {r['every_step_logged']}) | backlog in {r['backlog_delivered_s_after_restart']} s after the "
                  f"server returned ({r['outage_s']} s outage) | — | rc {r['exit_code']} | — |")
        elif r["fault"] == "preprocess_kill":
            print(f"| preprocess_kill | — | — | 0 rows (rows {r['rows']}/{r['rows_expected']}, identical to the "
                  f"uninterrupted run: {r['identical_rows']}) | rerun {r['rerun_s']} s (clean run {r['clean_run_s']} s) | "
                  f"{r['rerun_s']} s | rc {r['exit_code']} | — |")
        else:
            print(f"| {r['fault']} | {r['step_at_fault']} | {r['resumed_from']} | {r['steps_lost']} | {r['recover_s']} s | "
                  f"{r['fault_to_end_s']} s | step {r['final_step']}/{steps}, rc {r['exit_code']} | "
                  f"{r['checkpoints_complete']} {r['checkpoint_steps']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", default=",".join(ALL_FAULTS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--fault-at", type=int, default=15, help="inject once this step is logged")
    ap.add_argument("--preprocess-samples", type=int, default=3000)
    ap.add_argument("--outage-s", type=float, default=20.0, help="how long the MLflow server stays down")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--work", help="folder for the runs and their logs (default: a new temporary folder, kept)")
    args = ap.parse_args(argv)
    faults = args.faults.split(",")
    if unknown := sorted(set(faults) - set(ALL_FAULTS)):
        ap.error(f"unknown fault(s) {unknown}; choose from {', '.join(ALL_FAULTS)}")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(**NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    results = []
    try:
        root = Path(args.work or tempfile.mkdtemp(prefix="selfe-faults-"))
        print(f"[faults] runs and logs in {root}", flush=True)
        for fault in faults:
            work = root / fault
            work.mkdir(parents=True)
            print(f"[faults] {fault} ...", flush=True)
            try:
                if fault == "preprocess_kill":
                    res = run_preprocess_fault(cluster, work, args.preprocess_samples)
                elif fault == "mlflow_outage":
                    res = run_mlflow_outage(cluster, work, args.steps, args.checkpoint_every, args.fault_at, args.outage_s)
                else:
                    res = run_train_fault(fault, cluster, nodes, work, args.steps, args.checkpoint_every, args.fault_at)
            except Exception as e:  # one broken scenario must not hide the others' numbers
                res = {"fault": fault, "exit_code": -1, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(res), flush=True)
            results.append(res)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print_table(results, args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
