"""Job submission the real way: `ray start --head` on 127.0.0.1 in its own temp dir, `ray job submit`,
wait, then stop that cluster's processes only (`ray stop` would stop every Ray on the machine).
The fast tests check what a job prints about where its dashboard and MLflow runs are."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

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
    fit in 107 bytes), with token auth as a real cluster has it: a fresh token in $RAY_AUTH_TOKEN (so
    ~/.ray/auth_token is neither needed nor touched) and RAY_AUTH_MODE=token for it and its clients."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
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
             "--eval.steps=1", "--eval.max_prompts=1", "--eval.untrained_reference=false", "--train.compile=false"]


def _submit(address: str, env: dict, job_id: str, runtime_env: dict, args: list[str]) -> tuple[str, str]:
    """Submit ``pipelines/train.py args`` and wait for it to end: (final status, logs)."""
    _start(address, env, job_id, runtime_env, args)
    return _wait(address, env, job_id)


def _start(address: str, env: dict, job_id: str, runtime_env: dict, args: list[str]) -> None:
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
           "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "pipelines/train.py", *args]
    deadline = time.time() + 180
    while True:  # the head's dashboard agent can come up after `ray start` returns, later on a loaded box
        sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if sub.returncode == 0 or "No available agent" not in sub.stderr + sub.stdout or time.time() > deadline:
            break
        time.sleep(5)
    assert sub.returncode == 0, (sub.stdout + sub.stderr)[-3000:]


def _wait(address: str, env: dict, job_id: str) -> tuple[str, str]:
    deadline, status = time.time() + 420, "PENDING"
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(5)
        status = _status(address, job_id, env)
    out = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                         text=True, timeout=60)
    return status, out.stdout + out.stderr


def test_job_locations_name_the_dashboard_and_how_to_browse_mlflow() -> None:
    from pipelines.train import job_locations
    from selfe.config import load_config

    job = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc"}})
    sqlite = load_config(overrides=["--tracking.tracking_uri=sqlite:////data/selfe/mlflow.db"])
    assert job_locations(sqlite, "127.0.0.1:8265", job) == [
        "Ray dashboard:   http://127.0.0.1:8265 (Jobs tab: raysubmit_abc)",
        "MLflow UI:       mlflow ui --backend-store-uri sqlite:////data/selfe/mlflow.db on the node that runs this driver",
    ]
    server = load_config(overrides=["--tracking.tracking_uri=http://mlflow.mlflow.svc.cluster.local:5000"])
    assert job_locations(server, "http://10.0.0.5:8265") == [
        "Ray dashboard:   http://10.0.0.5:8265", "MLflow UI:       http://mlflow.mlflow.svc.cluster.local:5000"]
    off = load_config(overrides=["--tracking.enabled=false"])
    assert job_locations(off, "") == ["MLflow:          off (tracking.enabled=false)"]


def test_a_driver_on_a_cluster_prints_the_locations_before_training(monkeypatch, capsys, tmp_path) -> None:
    """`main` with RAY_ADDRESS set joins the cluster and prints the lines before training starts."""
    import ray

    import pipelines.train as train
    import selfe.train.job

    class Context:
        dashboard_url = "127.0.0.1:8265"

    class TrainingStarted(Exception):
        pass

    def start_training(*args, **kwargs):
        raise TrainingStarted

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("SELFE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: Context())
    monkeypatch.setattr(selfe.train.job, "run_training", start_training)
    with pytest.raises(TrainingStarted):
        train.main([])
    out = capsys.readouterr().out
    assert "Ray dashboard:   http://127.0.0.1:8265\n" in out
    assert f"MLflow UI:       mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlflow.db" in out


@pytest.mark.slow
def test_ray_job_submit_trains_and_registers_outside_the_working_dir_copy(cluster, tmp_path):
    """With relative defaults only, SELFE_HOME puts the registry, checkpoints and model in a durable
    folder; a job without it refuses to start instead of writing into Ray's package copy."""
    address, env = cluster
    # The first-contact failure the README warns about: a client without RAY_AUTH_MODE=token sends no token.
    tokenless = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    denied = subprocess.run([RAY, "job", "submit", "--address", address, "--", "python", "-c", "print(1)"],
                            env=tokenless, capture_output=True, text=True, timeout=120)
    said = denied.stdout + denied.stderr
    assert denied.returncode != 0 and "AuthenticationError" in said and "Missing authentication token" in said, said
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
    assert "[selfe] step " in logs and " img/s" in logs  # rank 0's progress lines reach the job log
    # ... once each, and Ray's own output stays in the run's log file under SELFE_HOME
    steps = [line for line in logs.splitlines() if line.startswith("[selfe] step ")]
    assert steps and len(steps) == len(set(steps)), steps
    for noise in ("logging_progress", "PlacementGroupCleaner", "TrainingReport(", "RayTrainWorker pid="):
        assert noise not in logs, (noise, logs[-3000:])
    assert (home / "outputs" / "logs" / "submitted.log").is_file()
    # Printed before training: the dashboard this job is on and how to browse its MLflow runs.
    assert f"Ray dashboard:   {address} (Jobs tab: selfe-test-" in logs, logs[:3000]
    db = f"sqlite:///{home.resolve() / 'mlflow.db'}"
    assert f"MLflow UI:       mlflow ui --backend-store-uri {db} on the node that runs this driver" in logs
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

    # `ray job stop` (SIGTERM to the driver, SIGKILL 3 s later) leaves the run KILLED, not RUNNING.
    job = f"selfe-stop-{int(time.time())}"
    _start(address, env, job, runtime_env, [*SMALL_RUN, "--train.steps=100000", "--train.run_name=stopped"])
    run_dir = home / "outputs" / "ray_results" / "stopped"
    deadline = time.time() + 300
    while time.time() < deadline and not list(run_dir.glob("checkpoint_*/.metadata")):
        time.sleep(1)
    assert list(run_dir.glob("checkpoint_*/.metadata")), _wait(address, env, job)[1][-3000:]
    subprocess.run([RAY, "job", "stop", "--address", address, job], env=env, capture_output=True, timeout=120)
    status, logs = _wait(address, env, job)
    assert status == "STOPPED" and "stopped (SIGTERM); rerun with --train.run_name=stopped" in logs, logs[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("selfe").experiment_id],
                                "tags.`selfe.train_run_name` = 'stopped'")
    assert run.info.status == "KILLED" and not (run_dir / ".selfe-owner.json").exists()
