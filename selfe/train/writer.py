"""A training worker's checkpoints: written, then handed to Ray Train, with as little of it as possible
on the training loop's time.

Two independent choices (``train.checkpoint_write`` and ``train.checkpoint_upload``, both "async" by
default):

* write: "sync" writes the folder before training goes on; "async" copies the state into host memory
  (``save_checkpoint_async``), lets training go on, writes the files on a background thread, and
  reports the checkpoint, with its step's metrics, at the first step boundary where every rank's
  files are written (``poll``; before any other report, waiting for the files there if need be);
* upload: Ray Train copies a reported folder to ``train.storage_path`` in the background ("async") or
  before ``report`` returns ("sync").

A checkpoint a worker needs now (a preemption notice's, the last step's) is written and uploaded
synchronously, after any background one has been reported.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import ray.train
import torch
import torch.distributed as dist

from selfe.config import TrainConfig
from selfe.train.checkpoint import save_checkpoint, save_checkpoint_async
from selfe.train.step import Trainee


@dataclass
class _Pending:
    written: Future
    folder: str
    metrics: dict[str, Any]
    stall_s: float


class CheckpointWriter:
    """Writes and reports one worker's checkpoints (every rank calls the same methods at the same steps:
    writing and reporting are collective). ``timeline`` receives the marks ``checkpoint_start``,
    ``checkpoint_saved`` (training may go on) and ``checkpoint_reported``."""

    def __init__(self, train: TrainConfig, world: int, device: torch.device, timeline: dict[str, float],
                 facts: Callable[[], dict[str, Any]]) -> None:
        self.upload = ray.train.CheckpointUploadMode.ASYNC if train.checkpoint_upload == "async" \
            else ray.train.CheckpointUploadMode.SYNC
        self.background = train.checkpoint_write == "async"
        # The background writes' own collectives get their own gloo group (made by every rank, in order).
        self.group = dist.new_group(backend="gloo") if self.background and dist.is_initialized() and world > 1 \
            else None
        self.world, self.device, self.timeline = world, device, timeline
        self.facts = facts  # what every report carries besides its metrics, read at report time
        self.pending: _Pending | None = None
        self.save_s = 0.0
        """What a synchronous checkpoint took, or would take: write (+ upload when sync) and report."""
        self.stall_s = 0.0
        """Training time all reported checkpoints took from the loop so far, and their count."""
        self.reported = 0

    def save(self, tr: Trainee, progress: dict, metrics: dict[str, Any], now: bool = False) -> None:
        """Checkpoint ``tr`` at ``progress`` and report ``metrics`` (+ ``facts()``, read at report time).
        ``now``: written and uploaded before this returns."""
        self.flush()
        start = self.timeline["checkpoint_start"] = time.time()
        folder = tempfile.mkdtemp(prefix="selfe-checkpoint-")
        if self.background and not now:
            written = save_checkpoint_async(folder, tr.model, tr.ema, tr.optimizer, progress, tr.generator, self.group)
            # The step's metrics go with the checkpoint, at the next report: reports stay in step order.
            self.timeline["checkpoint_saved"] = self.timeline["checkpoint_reported"] = time.time()
            self.pending = _Pending(written, folder, metrics, self.timeline["checkpoint_saved"] - start)
            return
        save_checkpoint(folder, tr.model, tr.ema, tr.optimizer, progress, tr.generator)
        self.timeline["checkpoint_saved"] = time.time()
        self._report(folder, metrics, ray.train.CheckpointUploadMode.SYNC if now else self.upload)
        self.timeline["checkpoint_reported"] = time.time()
        self.save_s = self.timeline["checkpoint_reported"] - start
        self._count(self.save_s)

    def poll(self) -> None:
        """At a step boundary: report the background checkpoint once every rank has written its files
        (one all-reduce of a flag per step while one is being written; ranks differ in when theirs
        finish, and reporting is collective)."""
        if self.pending is None:
            return
        done = self.pending.written.done()
        if self.world > 1 and dist.is_initialized():
            flag = torch.tensor([float(done)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            done = bool(flag.item())
        if done:
            self.flush()

    def flush(self) -> None:
        """Report the checkpoint being written in the background, waiting for its files if need be."""
        if self.pending is None:
            return
        p, self.pending = self.pending, None
        t0 = time.time()
        write_s = p.written.result()  # re-raises a failed write: training must not go on without checkpoints
        self._report(p.folder, p.metrics, self.upload)
        waited = time.time() - t0
        self.save_s = p.stall_s + write_s  # a synchronous write would have cost about this
        self._count(p.stall_s + waited)

    def _report(self, folder: str, metrics: dict[str, Any], mode) -> None:
        ray.train.report({**metrics, **self.facts()}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)

    def _count(self, stall_s: float) -> None:
        self.stall_s += stall_s
        self.reported += 1
