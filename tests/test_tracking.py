"""RunLogger against a tracking server that hangs: training-side logging must not wait for it."""

from __future__ import annotations

import threading
import time

import pytest

from selfe.tracking import RunLogger


class HangingClient:
    """log_batch blocks until released (a server that accepts the connection and never answers),
    then fails once (the retries ran out) before the server comes back."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self.sent: list = []

    def log_batch(self, run_id, metrics=()):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.release.wait(30)
            raise ConnectionError("server gone")
        self.sent.extend(metrics)


def test_log_metrics_does_not_wait_for_a_hanging_send(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never contacted: the client is replaced
    logger = RunLogger("run0", spool_dir=tmp_path, retry_s=0.2)
    client = logger.client = HangingClient()
    logger.log_metrics({"loss": 1.0}, 1)
    assert client.entered.wait(10)  # the sender thread is now stuck inside log_batch
    t0 = time.perf_counter()
    for step in range(2, 12):
        logger.log_metrics({"loss": 1.0 / step}, step)
    assert time.perf_counter() - t0 < 0.5  # a stuck send used to hold the lock log_metrics needs
    with pytest.warns(UserWarning, match="MLflow unreachable"):
        client.release.set()
        deadline = time.time() + 10
        while client.calls < 2 and time.time() < deadline:
            time.sleep(0.05)
    assert logger.close(timeout_s=10)
    assert sorted(m.step for m in client.sent) == list(range(1, 12))  # nothing lost, nothing sent twice
    assert len((tmp_path / "selfe-metrics-run0.jsonl").read_text().splitlines()) == 11
