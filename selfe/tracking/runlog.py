"""Metrics for one MLflow run that never block or crash training, and survive an outage.

The local JSONL spool is the queue: ``log_metrics`` appends to it and returns, and a background
thread sends it front to back in batches, recording in ``<spool>.sent`` the byte offset delivered so
far. Memory therefore stays at one batch however long the server is away (nothing is dropped), and
a killed process loses nothing: the next logger for the same run resumes from the recorded offset.
Its first batch may overlap what the dead logger sent just before dying; pairs (key, step) the
server already has are skipped there. ``close`` returns within its deadline even when a send is
stuck in the client's retries (MLflow's defaults retry one call for about four minutes).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

SPOOL_ENV = "SELFE_METRICS_SPOOL"
BATCH = 900  # MLflow's log_batch accepts up to 1000 metrics


def default_spool_dir() -> Path:
    """``$SELFE_METRICS_SPOOL``, else ``<tmp>/selfe-metrics``."""
    return Path(os.environ.get(SPOOL_ENV) or Path(tempfile.gettempdir()) / "selfe-metrics")


def _metric(line: bytes) -> mlflow.entities.Metric | None:
    try:
        r = json.loads(line)
        return mlflow.entities.Metric(r["key"], r["value"], r["timestamp"], r["step"])
    except (ValueError, KeyError):  # a line cut by a crash mid-write
        return None


class RunLogger:
    """``log_metrics`` appends and returns; a daemon thread delivers from the spool file."""

    def __init__(self, run_id: str, spool_dir: str | Path | None = None, retry_s: float = 5.0,
                 tracking_uri: str | None = None) -> None:
        self.run_id = run_id
        # Workers do not inherit the driver's mlflow state: they name the server explicitly.
        self.client = MlflowClient(tracking_uri or None)
        directory = Path(spool_dir) if spool_dir else default_spool_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.spool = directory / f"selfe-metrics-{run_id}.jsonl"
        self.sent_file = self.spool.with_suffix(".sent")
        self.retry_s = retry_s
        self.failures = 0
        self._offset = self._read_offset()
        self._lock = threading.Lock()
        self._out = self.spool.open("ab")
        if self._out.tell() and self.spool.read_bytes()[-1:] != b"\n":
            self._out.write(b"\n")  # end a line a crash cut short, so the next one starts clean
        self.replayed = self._undelivered_lines()
        self._check_overlap = self.replayed > 0  # the dead logger's last batch may have arrived
        self._wake = threading.Event()
        self._closing = self._stopped = False
        self._thread = threading.Thread(target=self._sender, name="mlflow-sender", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the spool

    def _read_offset(self) -> int:
        try:
            return int(self.sent_file.read_text())
        except (OSError, ValueError):
            return 0

    def _undelivered_lines(self) -> int:
        with self.spool.open("rb") as fh:
            fh.seek(self._offset)
            return sum(1 for _ in fh)

    @property
    def pending(self) -> int:
        """Metrics logged (by this or an earlier logger of the run) and not yet delivered."""
        return self._undelivered_lines()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        lines = [json.dumps({"key": k, "value": float(v), "step": step, "timestamp": ts}) + "\n"
                 for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)]
        with self._lock:
            self._out.write("".join(lines).encode())
            self._out.flush()
        self._wake.set()

    def _next_batch(self) -> tuple[list[mlflow.entities.Metric], int]:
        """Up to BATCH complete lines from the delivered offset: (metrics, offset after them)."""
        metrics, offset = [], self._offset
        with self.spool.open("rb") as fh:
            fh.seek(offset)
            while len(metrics) < BATCH:
                line = fh.readline()
                if not line.endswith(b"\n"):  # end of file, or a line still being written
                    break
                offset += len(line)
                if (m := _metric(line)) is not None:
                    metrics.append(m)
        return metrics, offset

    def _mark_delivered(self, offset: int) -> None:
        self._offset = offset
        tmp = self.sent_file.with_suffix(".sent.tmp")
        tmp.write_text(str(offset))
        tmp.replace(self.sent_file)

    # ------------------------------------------------------------------ sending

    def _sender(self) -> None:
        while not self._stopped:
            if not self._closing:
                self._wake.wait(self.retry_s)
                self._wake.clear()
            if self._send_all() and self._closing:
                return
            if self._closing:
                time.sleep(min(self.retry_s, 1.0))

    def _send_all(self) -> bool:
        """Deliver the spool front to back; True when all of it is delivered."""
        while not self._stopped:
            batch, end = self._next_batch()
            if end == self._offset:
                return True
            try:
                if self._check_overlap:
                    batch = self._without_delivered(batch)
                if batch:
                    self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
                self.failures += 1
                if self.failures == 1 or self.failures % 50 == 0:
                    warnings.warn(f"MLflow unreachable ({type(e).__name__}: {str(e)[:200]}); metrics wait in "
                                  f"{self.spool}; retrying every {self.retry_s:g} s", stacklevel=2)
                return False
            self._check_overlap = False
            self._mark_delivered(end)
        return False

    def _without_delivered(self, batch: list[mlflow.entities.Metric]) -> list[mlflow.entities.Metric]:
        have = {(key, m.step) for key in {m.key for m in batch}
                for m in self.client.get_metric_history(self.run_id, key)}
        return [m for m in batch if (m.key, m.step) not in have]

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to ``timeout_s`` for everything logged to be delivered; True when it was."""
        deadline = time.time() + timeout_s
        self._wake.set()
        while self._offset < self.spool.stat().st_size and time.time() < deadline:  # no re-read of the spool
            time.sleep(0.05)
        return self._offset >= self.spool.stat().st_size

    def close(self, timeout_s: float = 60.0) -> bool:
        """Deliver for up to ``timeout_s``, then stop; returns within the deadline whatever the
        server does. False (with a warning naming the spool) if anything is undelivered."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)
        self._stopped = True  # a send stuck in retries ends with the process; nothing waits for it
        self._out.close()
        left = self.pending
        if left:
            warnings.warn(f"{left} metrics did not reach MLflow; they are in {self.spool} and the next logger "
                          f"for run {self.run_id} (a resumed job) delivers them", stacklevel=2)
        return not left

    # ------------------------------------------------------------------ artifacts

    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / Path(artifact_path).name
                target.write_bytes(data)
                self.client.log_artifact(self.run_id, str(target), str(Path(artifact_path).parent) or None)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"could not log artifact {artifact_path} to MLflow: {e}", stacklevel=2)
