"""Sharded checkpoints with torch.distributed.checkpoint (DCP): model, EMA, optimiser, progress, RNG.

Each rank writes its own shard files (DCP names them by rank) plus ``rng_rank{r}.pt``, so the
per-rank folders can be merged into one checkpoint (Ray Train does this on report). Loading
reshards, so a checkpoint written by N workers loads into M workers or into one plain model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)

from selfe.ema import reshard

PROGRESS_FILE = "progress.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict,
    generator: torch.Generator | None = None,
) -> None:
    """Write this rank's part of the checkpoint into ``path`` (a local folder)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    reshard(model)
    reshard(ema)
    state = {
        "model": get_model_state_dict(model),
        "ema": get_model_state_dict(ema),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.save(state, checkpoint_id=str(path))
    rank = _rank()
    rng = rng_state()
    if generator is not None:
        rng["generator"] = generator.get_state()
    torch.save(rng, path / f"rng_rank{rank}.pt")
    if rank == 0:
        (path / PROGRESS_FILE).write_text(json.dumps(progress))


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
) -> dict:
    """Restore model, EMA, optimiser and this rank's RNG from ``path``; returns the progress dict."""
    path = Path(path)
    state = {
        "model": get_model_state_dict(model),
        "ema": get_model_state_dict(ema),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():  # absent when resuming with more workers than wrote the checkpoint
        rng = torch.load(rng_file, weights_only=False)
        set_rng_state(rng)
        if generator is not None and "generator" in rng:
            generator.set_state(rng["generator"])
    return json.loads((path / PROGRESS_FILE).read_text())


def load_weights(path: str | Path, model: nn.Module, which: str = "ema") -> dict:
    """Load the ``which`` ("ema" or "model") weights of a checkpoint into a plain, unsharded model
    in a single process (no process group needed). Returns the progress dict."""
    path = Path(path)
    state = {which: model.state_dict()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state[which])
    return json.loads((path / PROGRESS_FILE).read_text())


def is_complete(path: str | Path) -> bool:
    """A checkpoint folder is usable once DCP's metadata and the progress file both exist."""
    path = Path(path)
    return (path / ".metadata").exists() and (path / PROGRESS_FILE).exists()
