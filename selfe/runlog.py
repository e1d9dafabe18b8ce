"""Metrics for one MLflow run that never block or crash training, and survive an outage.

Every metric is appended to a local JSONL spool first (a killed process loses nothing); a
background thread sends them. While the server is unreachable they wait in a bounded in-memory
queue: beyond ``max_pending`` the oldest are dropped from memory (counted and reported) but stay
in the spool. A ``<spool>.sent`` file records how far the spool has been delivered, so the next
logger for the same run replays the rest, skipping (key, step) pairs the server already has.
``close`` returns within its deadline even when a send is stuck in the client's retries (MLflow's
defaults retry one call for about four minutes).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import warnings
from collections import deque
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

SPOOL_ENV = "SELFE_METRICS_SPOOL"
_BATCH = 900  # MLflow's log_batch accepts up to 1000 metrics


def default_spool_dir() -> Path:
    """``$SELFE_METRICS_SPOOL``, else ``<tmp>/selfe-metrics``."""
    return Path(os.environ.get(SPOOL_ENV) or Path(tempfile.gettempdir()) / "selfe-metrics")


class RunLogger:
    """``log_metrics`` appends and returns; a daemon thread delivers. Holds at most ``max_pending``
    metrics in memory whatever the outage length."""

    def __init__(self, run_id: str, spool_dir: str | Path | None = None, retry_s: float = 5.0,
                 max_pending: int = 50_000) -> None:
        self.run_id = run_id
        self.client = MlflowClient()
        directory = Path(spool_dir) if spool_dir else default_spool_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.spool = directory / f"selfe-metrics-{run_id}.jsonl"
        self.sent_file = self.spool.with_suffix(".sent")
        self.retry_s, self.max_pending = retry_s, max_pending
        self.failures = self.dropped = 0
        self.pending: deque[tuple[int, mlflow.entities.Metric]] = deque()  # (spool line, metric)
        self._lines = self._count_lines()
        self._first_dropped: int | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = self._stopped = False
        self.replayed = self._replay()
        self._thread = threading.Thread(target=self._sender, name="mlflow-sender", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ spool

    def _count_lines(self) -> int:
        if not self.spool.exists():
            return 0
        with self.spool.open("rb") as fh:
            return sum(1 for _ in fh)

    def _delivered_until(self) -> int:
        try:
            return int(self.sent_file.read_text())
        except (OSError, ValueError):
            return 0

    def _replay(self) -> int:
        """Queue what an earlier logger for this run spooled but did not deliver, minus what the
        server already has (same key and step). Returns how many were queued."""
        start = self._delivered_until()
        if start >= self._lines:
            return 0
        rows = []
        with self.spool.open() as fh:
            for i, line in enumerate(fh):
                if i >= start and line.strip():
                    try:
                        rows.append((i, json.loads(line)))
                    except ValueError:  # a line cut by a crash mid-write
                        continue
        try:
            have = {(r["key"], m.step) for r in {r["key"]: r for _, r in rows}.values()
                    for m in self.client.get_metric_history(self.run_id, r["key"])}
        except Exception:  # noqa: BLE001 - server down again: send all; MLflow ignores exact duplicates
            have = set()
        for i, r in rows:
            if (r["key"], r["step"]) not in have:
                self.pending.append((i, mlflow.entities.Metric(r["key"], r["value"], r["timestamp"], r["step"])))
        self._trim()
        if not self.pending:
            self._mark_delivered(self._lines)
        return len(self.pending)

    def _mark_delivered(self, line: int) -> None:
        tmp = self.sent_file.with_suffix(".sent.tmp")
        tmp.write_text(str(line))
        tmp.replace(self.sent_file)

    # ------------------------------------------------------------------ logging

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        new = [mlflow.entities.Metric(k, float(v), ts, step) for k, v in metrics.items()
               if isinstance(v, (int, float)) and np.isfinite(v)]
        with self._lock:
            with self.spool.open("a") as fh:
                for m in new:
                    fh.write(json.dumps({"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp})
                             + "\n")
            for m in new:
                self.pending.append((self._lines, m))
                self._lines += 1
            self._trim()
        self._wake.set()

    def _trim(self) -> None:
        """Drop the oldest pending metrics beyond ``max_pending`` from memory (they stay spooled)."""
        over = len(self.pending) - self.max_pending
        if over <= 0:
            return
        if self._first_dropped is None:
            self._first_dropped = self.pending[0][0]
            warnings.warn(f"MLflow backlog over {self.max_pending} metrics: dropping the oldest from memory; "
                          f"they stay in {self.spool} and are replayed by the next logger for this run",
                          stacklevel=3)
        for _ in range(over):
            self.pending.popleft()
        self.dropped += over

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
        """Deliver the queue front to back; True when it is empty. The network call runs without
        the lock, so ``log_metrics`` never waits for the server."""
        while not self._stopped:
            with self._lock:
                batch = [self.pending[i] for i in range(min(_BATCH, len(self.pending)))]
            if not batch:
                return True
            try:
                self.client.log_batch(self.run_id, metrics=[m for _, m in batch])
            except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
                self.failures += 1
                if self.failures == 1 or self.failures % 50 == 0:
                    warnings.warn(f"MLflow unreachable ({type(e).__name__}: {str(e)[:200]}); {len(self.pending)} "
                                  f"metrics queued, all in {self.spool}; retrying every {self.retry_s:g} s",
                                  stacklevel=2)
                return False
            with self._lock:
                # Only this thread removes from the front; a trim may have removed some already.
                while self.pending and self.pending[0][0] <= batch[-1][0]:
                    self.pending.popleft()
                front = self.pending[0][0] if self.pending else self._lines
                self._mark_delivered(front if self._first_dropped is None else min(front, self._first_dropped))
        return False

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to ``timeout_s`` for the queue to empty; True when it did."""
        deadline = time.time() + timeout_s
        self._wake.set()
        while self.pending and time.time() < deadline:
            time.sleep(0.05)
        return not self.pending

    def close(self, timeout_s: float = 60.0) -> bool:
        """Deliver for up to ``timeout_s``, then stop; returns within the deadline whatever the
        server does. False (with a warning naming the spool) if anything is undelivered."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)
        self._stopped = True  # a send stuck in retries ends with the process; nothing waits for it
        undelivered = len(self.pending) + self.dropped
        if undelivered:
            warnings.warn(f"{undelivered} metrics did not reach MLflow ({self.dropped} dropped from memory); "
                          f"they are in {self.spool} and a logger for run {self.run_id} replays them",
                          stacklevel=2)
        return not undelivered

    # ------------------------------------------------------------------ artifacts

    def log_artifact_bytes(self, data: bytes, artifact_path: str) -> None:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / Path(artifact_path).name
                target.write_bytes(data)
                self.client.log_artifact(self.run_id, str(target), str(Path(artifact_path).parent) or None)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"could not log artifact {artifact_path} to MLflow: {e}", stacklevel=2)
