"""Exponential moving average of a network's weights.

The EMA network is a full module with the same structure as the online one (and, under FSDP, the
same sharding), so the objective can call it like the online model for the conditional evaluation
branch. Updates touch only local shards: ``lerp_`` on DTensors stays local.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EMAConfig:
    """EMA of the online weights."""

    decay: float = 0.9999
    """Target decay per step [paper]. Ignored when ``half_life_kimg`` is set."""
    half_life_kimg: float = 0.0
    """EMA half-life in thousands of training images (EDM): the decay per step is
    0.5 ** (batch / half-life), so it does not change meaning with the batch size. 0: use ``decay``. [ours]"""
    warmup: bool = True
    """Ramp the EMA up in short runs: with ``decay``, min(decay, (1 + step) / (10 + step)); with a
    half-life, at most 5% of the images seen so far (EDM's ramp-up). [ours]"""

    def validate(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")
        if not self.half_life_kimg >= 0.0:
            raise ValueError(f"ema.half_life_kimg must be >= 0, got {self.half_life_kimg}")


def ema_decay_at(step: int, cfg: EMAConfig, batch_size: int) -> float:
    """Decay for the EMA update after optimiser step ``step`` (0-based) of global ``batch_size`` images."""
    if cfg.half_life_kimg > 0:
        half_life = 1000.0 * cfg.half_life_kimg
        if cfg.warmup:
            half_life = min(half_life, 0.05 * (step + 1) * batch_size)
        return 0.5 ** (batch_size / max(half_life, 1e-8))
    if not cfg.warmup:
        return cfg.decay
    return min(cfg.decay, (1.0 + step) / (10.0 + step))


def make_ema(model: nn.Module, empty: nn.Module | None = None) -> nn.Module:
    """A frozen copy of ``model``.

    FSDP-sharded modules cannot be deep-copied: pass ``empty``, a module built and sharded the
    same way, and the online weights are copied into it shard by shard.
    """
    ema = copy.deepcopy(model) if empty is None else empty
    if empty is not None:
        update_ema(ema, model, 0.0)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def reshard(module: nn.Module) -> None:
    """Return FSDP2 modules to their sharded state.

    A forward under no_grad leaves the root's parameters gathered (its reshard normally happens
    after backward, which never comes), so the EMA's parameters would not be shards otherwise.
    """
    for sub in module.modules():
        if hasattr(sub, "reshard") and hasattr(sub, "unshard"):  # an FSDPModule
            sub.reshard()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    reshard(ema)
    reshard(model)
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError("EMA and model have different parameter lists; build the EMA with make_ema(model)")
    # Work on local shards: both models are sharded alike, so shard i of one matches shard i of the other.
    ema_local = [_local(pe) for pe in ema_params]
    local = [_local(p.detach()) for p in params]
    torch._foreach_lerp_(ema_local, local, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)
