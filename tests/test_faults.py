"""Multi-node behaviour on one machine: a Ray cluster of several nodes (ray.cluster_utils.Cluster),
training workers on different nodes, and the faults clusters produce."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from selfe.config import load_config
from selfe.core.model import build_model
from selfe.train.checkpoint import is_complete, load_weights
from selfe.train.job import fit
from tests.faults import LossRecord, Pace, read_losses
from tests.synthetic import TINY_OVERRIDES, inputs, synthetic_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NODE = {"num_cpus": 1, "resources": {"trainer": 1}}


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU, for Ray Data and the Train controller) and two 1-CPU 'trainer' nodes. The nodes get
    the runbook's setting for clusters whose lost nodes stay lost: after a node goes, Ray Train tries
    the old group size for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) before the smaller
    one; 20 s is ample for a tiny worker group here and saves the elastic test ~40 s."""
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"  # read by the nodes' processes at start
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [c.add_node(**NODE) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()
    os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")


def _cfg(tmp_path, name, steps=6):
    return load_config(overrides=[
        *TINY_OVERRIDES, f"--train.storage_path={tmp_path}", f"--train.run_name={name}", f"--train.steps={steps}",
        "--train.checkpoint_every=2", "--train.num_workers=2", "--train.cpus_per_worker=0.5",
        "--train.worker_resources.trainer=1", "--train.max_failures=3",
    ])


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("checkpoint_*") if p.is_dir())


def _wait_for_checkpoint(root: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(is_complete(p) for p in _checkpoints(root)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint under {root} after {timeout} s")


def _assert_finished(cfg, run_dir: Path) -> None:
    ckpts = _checkpoints(run_dir)
    assert ckpts and all(is_complete(p) for p in ckpts), "a checkpoint folder is incomplete"
    steps = sorted(load_weights(p, build_model(cfg.model))["step"] for p in ckpts)
    assert steps[-1] == cfg.train.steps


def test_workers_on_different_nodes_survive_node_loss(cluster, tmp_path):
    c, nodes = cluster
    cfg = _cfg(tmp_path, "node-loss", steps=8)
    loop = inputs(cfg)
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(result=fit(cfg, "node-loss", {"train": synthetic_dataset()}, loop)))
    runner.start()
    run_dir = tmp_path / "node-loss"
    _wait_for_checkpoint(run_dir)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len({a.node_id for a in workers}) == 2  # one worker per trainer node
    t_fail = time.time()
    c.remove_node(nodes[1])  # a whole node disappears mid-run
    replacement = c.add_node(**NODE)  # and the autoscaler brings one back
    runner.join(timeout=600)
    assert not runner.is_alive()
    result = out["result"]
    assert result.error is None and result.metrics["step"] == 8
    _assert_finished(cfg, run_dir)
    print(f"node loss: recovered and finished {time.time() - t_fail:.0f} s after the failure")
    nodes[1] = replacement


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.2)


def test_an_elastic_run_answers_a_preemption_notice_shrinks_grows_back_and_trains_the_uninterrupted_losses(
        cluster, tmp_path):
    """num_workers = 1-2 on two trainer nodes. One node gets a preemption notice (``ray drain-node``
    with a deadline, as the autoscaler sends for a spot reclaim) and the group writes a checkpoint at
    once, off the 8-step schedule; the node then goes, the group goes on with one worker from that
    checkpoint (no step lost) and writes the next scheduled checkpoint alone; the node comes back and
    the group grows to two at the next resize check, from a checkpoint one worker wrote. Global batch,
    global data order and the shared step generator make every step the uninterrupted 2-worker run's:
    losses equal to rtol 1e-4 (fp32 sums in another order only)."""
    c, nodes = cluster
    total, steps, pace = 28, ["--train.steps=28", "--train.checkpoint_every=8"], Pace(0.25)
    ref_cfg = _elastic_cfg(tmp_path, "fixed-2", "2", *steps, "--train.data_order=global")
    ref_log = tmp_path / "fixed.txt"
    assert fit(ref_cfg, "fixed-2", {"train": synthetic_dataset()}, inputs(ref_cfg, step_hooks=[LossRecord(str(ref_log))])
               ).error is None
    cfg = _elastic_cfg(tmp_path, "elastic", "1-2", *steps, "--train.resize_interval_s=1",
                       "--train.preemption_check_every=1")
    log, run_dir = tmp_path / "elastic.txt", tmp_path / "elastic"
    out: dict = {}
    loop = inputs(cfg, step_hooks=[LossRecord(str(log)), pace])
    runner = threading.Thread(target=lambda: out.update(result=fit(cfg, "elastic", {"train": synthetic_dataset()}, loop)))
    runner.start()
    recorded = lambda: read_losses(log) if log.exists() else ({}, [])  # noqa: E731
    _wait_for(lambda: len(recorded()[0]) >= 5 and recorded()[1][-1] == 2, 300, "5 steps on 2 workers")
    drain = subprocess.run(["ray", "drain-node", f"--address={c.address}", f"--node-id={nodes[1].node_id}",
                            "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (test)",
                            "--deadline-remaining-seconds=300"], capture_output=True, text=True, timeout=60)
    assert drain.returncode == 0, drain.stderr
    t_notice = time.time()
    unscheduled = lambda: [s for s in _registered_steps(run_dir) if s % 8]  # noqa: E731
    _wait_for(lambda: unscheduled(), 300, "a checkpoint answering the notice")
    (notice_step,) = unscheduled()
    t_saved = time.time()
    c.remove_node(nodes[1])  # the reclaim
    _wait_for(lambda: recorded()[1].count(1) >= 10, 400, "10 steps on 1 worker")  # past the step-16 checkpoint
    t_shrunk = time.time()
    nodes[1] = c.add_node(**NODE)
    _wait_for(lambda: recorded()[1][-1] == 2 and recorded()[1].count(1) >= 10, 300, "training on 2 workers again")
    t_grown = time.time()
    runner.join(timeout=600)
    assert not runner.is_alive() and out["result"].error is None, out.get("result")
    losses, worlds = recorded()
    reference, ref_worlds = read_losses(ref_log)
    assert set(ref_worlds) == {2} and sorted(losses) == sorted(reference) == list(range(1, total + 1))
    shrink, grow = worlds.index(1), len(worlds) - 1 - worlds[::-1].index(1)
    assert set(worlds[:shrink]) == {2} and set(worlds[shrink:grow + 1]) == {1} and set(worlds[grow + 1:]) == {2}, worlds
    first_alone = _steps_in_order(log)[shrink]
    assert first_alone == notice_step + 1, (first_alone, notice_step)  # resumed from the notice's checkpoint
    mine = torch.tensor([losses[s] for s in range(1, total + 1)])
    torch.testing.assert_close(mine, torch.tensor([reference[s] for s in range(1, total + 1)]), rtol=1e-4, atol=1e-6)
    print(f"elastic: notice -> checkpoint at step {notice_step} in {t_saved - t_notice:.1f} s; on 1 worker "
          f"{t_shrunk - t_saved:.1f} s after the node went; grew back {t_grown - t_shrunk:.1f} s after it returned; "
          f"steps recorded {len(worlds)} for {total}")


def _steps_in_order(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()]


def _registered_steps(run_dir: Path) -> list[int]:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [int(r["metrics"]["step"]) for r in results]


def _elastic_cfg(tmp_path, name: str, workers: str, *extra: str):
    return load_config(overrides=[
        *TINY_OVERRIDES, f"--train.storage_path={tmp_path}", f"--train.run_name={name}", f"--train.num_workers={workers}",
        "--train.cpus_per_worker=0.5", "--train.worker_resources.trainer=1", "--train.max_failures=3", *extra])


def test_killed_driver_resubmitted_with_the_same_name_resumes(cluster, tmp_path):
    c, _ = cluster
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, str(REPO / "pipelines/train.py"), *TINY_OVERRIDES, "--data.num_samples=48",
           "--train.run_name=driver-kill", "--train.steps=8", "--train.checkpoint_every=2",
           "--train.cpus_per_worker=0.5", "--eval.steps=1", "--eval.max_prompts=1", "--eval.untrained_reference=false",
           f"--train.storage_path={tmp_path / 'ray'}", f"--data.cache_root={tmp_path / 'cache'}",
           f"--tracking.tracking_uri=sqlite:///{db}", f"--out={tmp_path / 'out'}"]
    env = {**os.environ, "RAY_ADDRESS": c.address}
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "ray" / "driver-kill"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 400
    # Kill once Ray Train has registered a checkpoint (a folder it has not registered yet is not
    # resumable: the controller that would have recorded it is gone).
    while time.time() < deadline and not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # the job driver dies (and with it the Train controller it owns)
    first.wait(30)
    registered = [p for p in _checkpoints(run_dir) if p.name in snapshot.read_text() and is_complete(p)]
    saved = {load_weights(p, build_model(_cfg(tmp_path, "x").model))["step"] for p in registered}
    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert "steps:           8" in second.stdout
    # Both drivers logged to the same MLflow run (found by run name). Steps up to the first
    # checkpoint were logged once: the rerun resumed from a checkpoint instead of starting over.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id and
                                [e.experiment_id for e in client.search_experiments()])
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert min(saved) >= 2 and logged.count(1) == 1 and logged.count(2) == 1, (logged, saved)
    assert set(logged) == set(range(1, 9))


def test_preprocess_killed_midway_and_rerun_gives_exactly_the_uninterrupted_rows(cluster, tmp_path):
    import pyarrow.parquet as pq

    def rows(cache_root: Path) -> list[str]:
        (cache,) = [p for p in cache_root.iterdir() if (p / "manifest.json").exists()]
        files = json.loads((cache / "manifest.json").read_text())["files"]
        table = pq.read_table([str(cache / f) for f in files], columns=["caption", "spec"])
        return sorted(c + "|" + s for c, s in zip(table["caption"].to_pylist(), table["spec"].to_pylist()))

    c, _ = cluster
    env = {**os.environ, "RAY_ADDRESS": c.address}
    base = [sys.executable, str(REPO / "pipelines/preprocess.py"), "--data.num_samples=600",
            "--text.max_tokens=16", "--data.encode_batch_size=32"]
    subprocess.run([*base, f"--out={tmp_path / 'ref'}"], env=env, check=True, capture_output=True, timeout=400)
    killed = subprocess.Popen([*base, f"--out={tmp_path / 'cut'}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill it once its build has started: the build's data folder exists from the write's start, while its
    # ~64 MB Parquet file (all 600 rows here) appears only a fraction of a second before the manifest.
    while time.time() < deadline and not list((tmp_path / "cut").glob("*/builds/*/data")):
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert not list((tmp_path / "cut").glob("*/manifest.json")), "a killed build must not look complete"
    rerun = subprocess.run([*base, f"--out={tmp_path / 'cut'}"], env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rows(tmp_path / "cut") == rows(tmp_path / "ref")  # no duplicates, no gaps
