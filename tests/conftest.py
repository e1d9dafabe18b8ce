"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL (http://127.0.0.1:PORT).

    Fake credentials and region are set while it runs so that boto3 and pyarrow sign requests without
    touching real AWS configuration. Tests create their own, uniquely named buckets.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@contextlib.contextmanager
def job_sandbox(root: Path) -> Iterator[Path]:
    """A fresh local Ray (a new instance even when `ray start` left a cluster on this machine), ``root``
    as the working directory and a private SQLite MLflow store there; all undone on exit."""
    import mlflow
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
            mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
            yield root
    finally:
        ray.shutdown()
