"""Job submission the real way: `ray start --head` on 127.0.0.1 in its own temp dir, `ray job submit`,
wait, then stop that cluster's processes only (`ray stop` would stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# The CLI that belongs to this interpreter, whether or not its bin folder is on PATH.
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(temp_dir: str) -> list[int]:
    """Pids of the processes whose command line names ``temp_dir`` (GCS, raylet, dashboard, ...) and all
    their descendants (workers and job drivers, whose titles no longer show it)."""
    parents, roots = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        if temp_dir in cmdline:
            roots.add(int(entry.name))
    found, grew = set(roots), True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        grew = bool(children)
        found |= children
    return sorted(found - {os.getpid()})


def _stop_cluster(temp_dir: str, grace_s: float = 15.0) -> None:
    """SIGTERM this cluster's processes, then SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_under(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while _processes_under(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


@pytest.fixture
def cluster():
    """A one-node Ray cluster started with the CLI in its own temp dir (short: Ray's socket paths must
    fit in 107 bytes). Token auth is disabled for this throwaway cluster, so that the CLI clients below
    need no token (see architecture.md)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("MLFLOW_TRACKING_URI", "SELFE_HOME"):  # earlier tests in this process may have set them
        env.pop(name, None)
    temp_dir = tempfile.mkdtemp(prefix="selfe-ray-", dir="/tmp")
    dash = _free_port()
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir)
        assert not _processes_under(temp_dir), "the test cluster's processes outlived it"


def _status(address: str, job: str, env: dict) -> str:
    """`ray job status` (the CLI's logger writes to stderr, so read both streams)."""
    out = subprocess.run([RAY, "job", "status", "--address", address, job], env=env, capture_output=True,
                         text=True, timeout=60)
    text = (out.stdout + out.stderr).lower()  # e.g. "Job 'x' succeeded", "Job 'x' is currently RUNNING"
    for word in ("succeeded", "failed", "stopped", "running", "pending"):
        if word in text:
            return word.upper()
    return "UNKNOWN"


SMALL_RUN = ["--data.num_samples=32", "--model.double_blocks=1", "--model.single_blocks=1", "--model.width=64",
             "--model.head_dim=16", "--train.steps=2", "--train.batch_size=8", "--train.checkpoint_every=2",
             "--eval.steps=1", "--eval.max_prompts=1", "--eval.untrained_reference=false"]


def _submit(address: str, env: dict, job_id: str, runtime_env: dict, args: list[str]) -> tuple[str, str]:
    """Submit ``pipelines/train.py args`` and wait for it to end: (final status, logs)."""
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
           "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "pipelines/train.py", *args]
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
    out = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                         text=True, timeout=60)
    return status, out.stdout + out.stderr


def test_ray_job_submit_trains_and_registers_outside_the_working_dir_copy(cluster, tmp_path):
    """With relative defaults only, SELFE_HOME puts the registry, checkpoints and model in a durable
    folder; a job without it refuses to start instead of writing into Ray's package copy."""
    address, env = cluster
    home = tmp_path / "home"
    excludes = ["outputs", "mlflow.db", "mlartifacts", ".git", "*.egg-info"]
    refused, logs = _submit(address, env, f"selfe-nohome-{int(time.time())}",
                            {"working_dir": str(REPO), "excludes": excludes}, SMALL_RUN)
    assert refused == "FAILED" and "set SELFE_HOME to a durable folder" in logs, logs[-3000:]

    runtime_env = {"working_dir": str(REPO), "excludes": excludes, "env_vars": {"SELFE_HOME": str(home)}}
    status, logs = _submit(address, env, f"selfe-test-{int(time.time())}", runtime_env,
                           [*SMALL_RUN, "--train.run_name=submitted"])
    assert status == "SUCCEEDED", logs[-3000:]
    assert "selfe training finished" in logs
    assert (home / "mlflow.db").exists() and (home / "outputs" / "ray_results" / "submitted").is_dir()
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("selfe", "candidate").version) == "1"
    # The registered model loads from another working directory, after the job's package copy is gone.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    gen = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "generate.py"), "--model", "models:/selfe@candidate",
         "--prompt", "a red circle", "--steps", "1", "--tracking-uri", f"sqlite:///{home / 'mlflow.db'}"],
        cwd=elsewhere, capture_output=True, text=True, timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert (elsewhere / "out.png").stat().st_size > 0
