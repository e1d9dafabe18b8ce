"""One job per run name: the owner marker refuses a second live job and is taken over from a dead one."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from selfe.train.owner import MARKER, RunInUseError, run_owner


SECOND_JOB = """
import sys
from selfe.train.owner import RunInUseError, run_owner
try:
    with run_owner(sys.argv[1], "run"):
        print("owned")
except RunInUseError as e:
    print(e)
"""


def test_a_second_job_with_the_same_run_name_is_refused(tmp_path):
    run = str(tmp_path / "run")
    with run_owner(run, "run"):
        second = subprocess.run([sys.executable, "-c", SECOND_JOB, run], capture_output=True, text=True, timeout=60)
        assert re.match(r"run 'run' is in use by another job .*use another train.run_name", second.stdout), second
        assert json.loads((tmp_path / "run" / MARKER).read_text())["host"] == socket.gethostname()
        with run_owner(run, "run"):  # the same job again (the pipeline claimed it, then fit() holds it)
            pass
        assert (tmp_path / "run" / MARKER).exists()  # the inner block does not release the outer's claim
    assert not (tmp_path / "run" / MARKER).exists()  # released at the end
    again = subprocess.run([sys.executable, "-c", SECOND_JOB, run], capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == "owned"  # and free again


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
        second = subprocess.run([sys.executable, "-c", SECOND_JOB, "s3://owners/runs/a"], capture_output=True,
                                text=True, timeout=60)
        assert "is in use by another job" in second.stdout, second
    with run_owner("s3://owners/runs/a", "a"):
        pass
