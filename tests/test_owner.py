"""One job per run name: the owner marker refuses a second live job and is taken over from a dead one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from selfe.train.owner import MARKER, RunInUseError, run_owner


def test_a_second_job_with_the_same_run_name_is_refused(tmp_path):
    run = str(tmp_path / "run")
    with run_owner(run, "run"):
        with pytest.raises(RunInUseError, match=r"run 'run' is in use by another job .*use another train.run_name"):
            with run_owner(run, "run"):
                pass
        assert json.loads((tmp_path / "run" / MARKER).read_text())["host"] == socket.gethostname()
    assert not (tmp_path / "run" / MARKER).exists()  # released at the end
    with run_owner(run, "run"):  # and free again
        pass


def _marker(path, **owner):
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": 0, "heartbeat": time.time(),
                                           "token": "x", **owner}))


def test_a_dead_owner_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _marker(tmp_path / "killed", pid=int(gone.stdout))  # a driver of this host that no longer exists
    with run_owner(str(tmp_path / "killed"), "killed"):
        pass
    _marker(tmp_path / "remote", host="other-node", pid=1, heartbeat=time.time() - 600)  # silent for 10 min
    with run_owner(str(tmp_path / "remote"), "remote", stale_s=180):
        pass
    _marker(tmp_path / "alive", host="other-node", pid=1)  # a fresh heartbeat from another node
    with pytest.raises(RunInUseError):
        with run_owner(str(tmp_path / "alive"), "alive"):
            pass


def test_the_owner_marker_works_on_s3(s3_server, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="owners")
    with run_owner("s3://owners/runs/a", "a"):
        with pytest.raises(RunInUseError):
            with run_owner("s3://owners/runs/a", "a"):
                pass
    with run_owner("s3://owners/runs/a", "a"):
        pass
