"""Which checkpoint a restarted run resumes from, and the checkpoint folders nobody registered.

Ray Train hands a restarted worker group its latest registered checkpoint only. If that one is
corrupt or partial (a truncated shard, a half-copied folder), resuming from it fails on every retry
until ``max_failures`` is spent, while an intact older checkpoint sits beside it. Here the workers
walk the run's registered checkpoints (``checkpoint_manager_snapshot.json``) newest first and take
the first that verifies and loads.

A checkpoint found unusable is set aside: rank 0 writes ``UNUSABLE`` into it (the reason), so no
later restart downloads or tries it again, and the next job start keeps it out of
``train.keep_checkpoints`` (``unusable_checkpoints``: Ray Train keeps that many more, and deletes the
set-aside one when its turn as the oldest comes). Ray's own snapshot is not edited: Ray refuses to
start on a snapshot that names a folder it cannot find.
"""

from __future__ import annotations

import json
import warnings
from typing import Callable

import pyarrow.fs as pafs
import ray.train
from torch.distributed.checkpoint.api import CheckpointException

from selfe.storage import filesystem_for
from selfe.train.checkpoint import verify_checkpoint

SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"
UNUSABLE = ".selfe-unusable"


def _filesystem(path: str, fs: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """``fs`` as given (Ray Train's own for its checkpoints), else ``selfe.storage``'s for ``path`` (an
    S3-compatible endpoint from the environment included)."""
    return (fs, path) if fs is not None else filesystem_for(path)


def registered_checkpoints(run_dir: str, fs: pafs.FileSystem | None = None) -> list[str] | None:
    """Folder names of the run's registered checkpoints, oldest first; None without a snapshot."""
    fs, run_dir = _filesystem(run_dir, fs)
    try:
        with fs.open_input_stream(f"{run_dir}/{SNAPSHOT}") as f:
            snapshot = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]


def resume_candidates(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """``latest`` first, then the run's other registered checkpoints, newest first."""
    run_dir, _, name = latest.path.rstrip("/").rpartition("/")
    names = registered_checkpoints(run_dir, latest.filesystem) or []
    older = [n for n in reversed(names) if n != name]
    return [latest] + [ray.train.Checkpoint(f"{run_dir}/{n}", filesystem=latest.filesystem) for n in older]


def restore_first_usable(latest: ray.train.Checkpoint, load: Callable[[str], dict],
                         mark: bool = False) -> tuple[dict, str]:
    """Verify and ``load(local_dir)`` each candidate until one works: (its progress, its path).

    A checkpoint already set aside is passed over unread; one whose files do not match their
    manifest, or whose load raises, is skipped with a warning and, with ``mark`` (rank 0), set aside.
    All ranks see the same files and DCP raises on every rank together, so every rank makes the same
    choice."""
    tried = []
    for ckpt in resume_candidates(latest):
        fs, path = _filesystem(ckpt.path, ckpt.filesystem)
        if fs.get_file_info(f"{path}/{UNUSABLE}").type == pafs.FileType.File:
            tried.append(f"{ckpt.path} (set aside earlier)")
            continue
        with ckpt.as_directory() as local:
            problems = verify_checkpoint(local)
            if not problems:
                try:
                    return load(local), ckpt.path
                except (CheckpointException, OSError, ValueError, RuntimeError, KeyError) as e:
                    problems = [f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"]
        reason = "; ".join(problems)[:300]
        tried.append(ckpt.path)
        if mark:
            with fs.open_output_stream(f"{path}/{UNUSABLE}") as f:
                f.write(json.dumps({"reason": reason}).encode())
        warnings.warn(f"[selfe] checkpoint {ckpt.path} is unusable ({reason}); set aside, trying the next older one",
                      stacklevel=2)
    raise RuntimeError(f"no usable checkpoint to resume from: tried {', '.join(tried)}; delete the run folder "
                       "(or use a new train.run_name) to start over")


def unusable_checkpoints(run_dir: str, fs: pafs.FileSystem | None = None) -> list[str]:
    """Names of the run's registered checkpoints that a restore set aside (``UNUSABLE`` inside)."""
    names = registered_checkpoints(run_dir, fs) or []
    fs, run_dir = _filesystem(run_dir, fs)
    infos = fs.get_file_info([f"{run_dir}/{n}/{UNUSABLE}" for n in names]) if names else []
    return [n for n, info in zip(names, infos) if info.type == pafs.FileType.File]


def remove_unregistered(run_dir: str, fs: pafs.FileSystem | None = None) -> list[str]:
    """Delete the run's checkpoint folders that Ray Train never registered (a worker died between
    writing and reporting one). Call before the run starts, never while it runs. Returns the names.

    A run folder without Ray's snapshot registered none: a job stopped before its first checkpoint was
    reported. Ray Train starts such a run from step 0, so its folders are removed too, not left beside
    the new checkpoints forever (outside ``num_to_keep``'s count) looking resumable."""
    names = registered_checkpoints(run_dir, fs) or []
    fs, run_dir = _filesystem(run_dir, fs)
    listing = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    stray = [i.base_name for i in listing if i.type == pafs.FileType.Directory
             and i.base_name.startswith(CHECKPOINT_PREFIX) and i.base_name not in names]
    for name in stray:
        fs.delete_dir(f"{run_dir}/{name}")
    return stray
