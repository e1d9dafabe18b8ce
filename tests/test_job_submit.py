"""Job submission the real way: `ray start --head` on 127.0.0.1, `ray job submit`, wait, `ray stop`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """A one-node Ray cluster started with the CLI. Token auth is disabled for this throwaway cluster,
    so that the CLI clients below need no token (see architecture.md)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    dash = _free_port()
    subprocess.run(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def _status(address: str, job: str, env: dict) -> str:
    """`ray job status` (the CLI's logger writes to stderr, so read both streams)."""
    out = subprocess.run(["ray", "job", "status", "--address", address, job], env=env, capture_output=True,
                         text=True, timeout=60)
    text = (out.stdout + out.stderr).lower()  # e.g. "Job 'x' succeeded", "Job 'x' is currently RUNNING"
    for word in ("succeeded", "failed", "stopped", "running", "pending"):
        if word in text:
            return word.upper()
    return "UNKNOWN"


def test_ray_job_submit_trains_and_registers(cluster, tmp_path):
    address, env = cluster
    db = tmp_path / "mlflow.db"
    runtime_env = {"working_dir": str(REPO), "excludes": ["outputs", "mlflow.db", "mlartifacts", ".git", "*.egg-info"]}
    job_id = f"selfe-test-{int(time.time())}"
    cmd = [
        "ray", "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
        "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "pipelines/train.py", "--data.num_samples=32", "--model.double_blocks=1",
        "--model.single_blocks=1", "--model.width=64", "--model.head_dim=16", "--train.steps=2",
        "--train.batch_size=8", "--train.checkpoint_every=2", "--eval.steps=1", "--eval.max_prompts=1",
        "--eval.untrained_reference=false", "--train.run_name=submitted", f"--tracking.tracking_uri=sqlite:///{db}",
        f"--data.cache_root={tmp_path / 'cache'}", f"--train.storage_path={tmp_path / 'ray_results'}",
        f"--out={tmp_path / 'outputs'}",
    ]
    deadline = time.time() + 180
    while True:  # the head's dashboard agent can come up after `ray start` returns, later on a loaded box
        sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if sub.returncode == 0 or "No available agent" not in sub.stderr + sub.stdout or time.time() > deadline:
            break
        time.sleep(5)
    assert sub.returncode == 0, (sub.stdout + sub.stderr)[-3000:]
    deadline, status = time.time() + 420, "PENDING"
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(5)
        status = _status(address, job_id, env)
    out = subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                         text=True, timeout=60)
    logs = out.stdout + out.stderr
    assert status == "SUCCEEDED", logs[-3000:]
    assert "selfe training finished" in logs
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert str(client.get_model_version_by_alias("selfe", "candidate").version) == "1"
