"""Every way a training job ends leaves its MLflow run ended: FINISHED (tests/test_pipeline.py), KILLED
on Ctrl-C (here) and on `ray job stop`'s SIGTERM (tests/test_job_submit.py, a real job stopped), FAILED
when the run cannot go on; a second job with the same run name is refused before Ray starts and creates
no run. Real `pipelines/train.py` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from selfe.train.resume import registered_checkpoints

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--data.num_samples=48", "--model.double_blocks=1", "--model.single_blocks=1", "--model.width=64",
    "--model.head_dim=16", "--text.max_tokens=16", "--train.batch_size=8", "--train.log_every=1",
    "--train.checkpoint_every=2", "--train.keep_checkpoints=2", "--train.compile=false", "--optim.warmup_steps=2",
    "--eval.steps=1", "--eval.max_prompts=1", "--eval.untrained_reference=false", "--num-cpus=2",
]


def command(name: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / "train.py"), *TINY, f"--train.run_name={name}", *extra]


def environment(home: Path) -> dict[str, str]:
    env = {**os.environ, "SELFE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def train(home: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(command(name, *extra), cwd=home, env=environment(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def train_to_end(home: Path, name: str, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command(name, *extra), cwd=home, env=environment(home), capture_output=True, text=True,
                          timeout=timeout)


def runs(home: Path, name: str) -> list:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`selfe.train_run_name` = '{name}'")


def wait_for_checkpoint(home: Path, name: str, proc: subprocess.Popen, timeout_s: float = 240) -> Path:
    """Wait until Ray Train has registered a checkpoint (named in its snapshot), not merely written one:
    a job stopped before its first registration is started again from step 0, not resumed."""
    run_dir = home / "outputs" / "ray_results" / name
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if registered_checkpoints(str(run_dir)):
            return run_dir
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no checkpoint after {timeout_s} s: {proc.communicate()[1][-3000:]}")


@pytest.mark.slow
def test_ctrl_c_kills_the_run_a_same_name_job_is_refused_and_an_unusable_resume_fails(tmp_path):
    job = train(tmp_path, "endings", "--train.steps=100000")
    run_dir = wait_for_checkpoint(tmp_path, "endings", job)

    t0 = time.time()
    second = train_to_end(tmp_path, "endings", "--train.steps=100000", timeout=120)
    refused_s = time.time() - t0
    assert second.returncode == 2 and second.stderr.startswith("train.py: error: run 'endings' is in use by another job")
    assert len(second.stderr.strip().splitlines()) == 1 and "Ray" not in second.stdout, second
    assert refused_s < 30, refused_s  # decided before Ray starts (a Ray start alone takes longer here)
    assert len(runs(tmp_path, "endings")) == 1  # and it created no MLflow run

    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-3000:]
    assert "stopped (Ctrl-C); rerun with --train.run_name=endings to resume" in err
    (run,) = runs(tmp_path, "endings")
    assert run.info.status == "KILLED"
    assert not (run_dir / ".selfe-owner.json").exists()  # the name is free again

    registered = registered_checkpoints(str(run_dir))
    shards = [s for name in registered for s in (run_dir / name).glob("*.distcp")]
    assert registered and all(any((run_dir / name).glob("*.distcp")) for name in registered), (registered, shards)
    for shard in shards:  # every registered checkpoint damaged: nothing to resume from
        shard.write_bytes(shard.read_bytes()[:-64])
    rerun = train_to_end(tmp_path, "endings", "--train.steps=100000", timeout=300)
    assert rerun.returncode == 1 and "training failed: " in rerun.stderr, rerun.stderr[-3000:]
    assert "no usable checkpoint" in rerun.stderr and "Traceback" not in rerun.stderr
    (run,) = runs(tmp_path, "endings")  # the same run, resumed, then ended as failed
    assert run.info.status == "FAILED"
