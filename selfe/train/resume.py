"""Which checkpoint a restarted run resumes from, the checkpoint folders nobody registered, and
whether a rerun's config may resume the checkpoints at all.

Ray Train hands a restarted worker group its latest registered checkpoint only. If that one is
corrupt or partial (a truncated shard, a half-copied folder), resuming from it fails on every retry
until ``max_failures`` is spent, while an intact older checkpoint sits beside it. Here the workers
walk the run's registered checkpoints (``checkpoint_manager_snapshot.json``) newest first and take
the first that verifies and loads.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, Callable

import pyarrow.fs as pafs
import ray.train
from torch.distributed.checkpoint.api import CheckpointException

from selfe.configtools import ConfigError
from selfe.data.cachekey import cache_key
from selfe.train.checkpoint import PROGRESS_FILE, verify_checkpoint

SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"


def _filesystem(path: str, fs: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if fs is not None:
        return fs, path
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


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


def restore_first_usable(latest: ray.train.Checkpoint, load: Callable[[str], dict]) -> tuple[dict, str]:
    """Verify and ``load(local_dir)`` each candidate until one works: (its progress, its path).

    A checkpoint whose files do not match their manifest, or whose load raises, is skipped with a
    warning. All ranks see the same files and DCP raises on every rank together, so every rank
    makes the same choice."""
    tried = []
    for ckpt in resume_candidates(latest):
        with ckpt.as_directory() as local:
            problems = verify_checkpoint(local)
            if not problems:
                try:
                    return load(local), ckpt.path
                except (CheckpointException, OSError, ValueError, RuntimeError, KeyError) as e:
                    problems = [f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"]
        tried.append(ckpt.path)
        warnings.warn(f"[selfe] checkpoint {ckpt.path} is unusable ({'; '.join(problems)[:300]}); "
                      "trying the next older one", stacklevel=2)
    raise RuntimeError(f"no usable checkpoint to resume from: tried {', '.join(tried)}; delete the run folder "
                       "(or use a new train.run_name) to start over")


def remove_unregistered(run_dir: str, fs: pafs.FileSystem | None = None) -> list[str]:
    """Delete the run's checkpoint folders that Ray Train never registered (a worker died between
    writing and reporting one). Call before the run starts, never while it runs. Returns the names."""
    names = registered_checkpoints(run_dir, fs)
    if names is None:
        return []
    fs, run_dir = _filesystem(run_dir, fs)
    listing = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    stray = [i.base_name for i in listing if i.type == pafs.FileType.Directory
             and i.base_name.startswith(CHECKPOINT_PREFIX) and i.base_name not in names]
    for name in stray:
        fs.delete_dir(f"{run_dir}/{name}")
    return stray


def training_identity(cfg: Any) -> dict[str, Any]:
    """What a run's checkpoints depend on, as dotted keys: model, objective, EMA, optimiser, the tau
    anneal, the step count (the lr and tau schedules stretch with it), global batch, seed and the
    cache's key. Resuming under other values would silently continue a different run. What may change
    between attempts is left out: workers, precision and parallel layout, logging, checkpoint cadence."""
    flat: dict[str, Any] = {}
    for section in ("model", "objective", "ema", "optim"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            flat[f"{section}.{key}"] = value
    flat.update({"anneal_fraction": cfg.anneal_fraction, "train.steps": cfg.train.steps,
                 "train.batch_size": cfg.train.batch_size, "train.seed": cfg.train.seed, "data.cache_key": cache_key(cfg)})
    return json.loads(json.dumps(flat))  # tuples -> lists: compares equal to what a progress file holds


def check_resume_identity(run_dir: str, identity: dict[str, Any], fs: pafs.FileSystem | None = None) -> None:
    """Refuse to resume ``run_dir``'s checkpoints under a config whose ``training_identity`` differs
    from the one the latest checkpoint recorded. Nothing to check without registered checkpoints, or
    when the latest one predates identities or cannot be read (the workers then fall back to an older one)."""
    names = registered_checkpoints(run_dir, fs)
    if not names:
        return
    fs, run_dir = _filesystem(run_dir, fs)
    try:
        with fs.open_input_stream(f"{run_dir}/{names[-1]}/{PROGRESS_FILE}") as f:
            saved = json.loads(f.read()).get("identity")
    except (FileNotFoundError, OSError, ValueError):
        return
    if saved is None:
        return
    changed = [f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in sorted(saved.keys() | identity.keys())
               if saved.get(k) != identity.get(k)]
    if changed:
        raise ConfigError(
            f"train.run_name {run_dir.rsplit('/', 1)[-1]!r} has checkpoints written under other training settings "
            f"({'; '.join(changed[:6])}{'; ...' if len(changed) > 6 else ''}): resuming them would continue a "
            f"different run. Rerun with the settings it was started with, or start over with a new "
            f"--train.run_name (or delete {run_dir})"
        )
