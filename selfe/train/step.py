"""One optimiser step of Self-E / flow matching, shared by the single-process loop and the
Ray Train worker (so there is exactly one copy of the step logic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from selfe.core.ema import update_ema
from selfe.core.objective import SelfEObjective
from selfe.core.types import Batch, TextCond

if TYPE_CHECKING:
    from selfe.config import OptimConfig


def mixed_precision_dtype(mode: str, device: torch.device | str) -> torch.dtype | None:
    """``train.mixed_precision`` -> the compute dtype: bf16 for "bf16", and for "auto" on CUDA; None
    (fp32) otherwise. On CPUs with AVX-512 BF16 "bf16" is an option too (oneDNN bf16 matmuls)."""
    if mode == "bf16" or (mode == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warm-up 0 -> lr over warmup_steps, then linear decay to lr_end at total_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr + (cfg.lr_end - cfg.lr) * frac


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam(W) over trainable parameters; foreach kernels work on sharded DTensors too."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=True)


@dataclass
class Trainee:
    """What one optimiser step updates: the online model, its EMA, the optimiser, and the generator
    that draws the step's random choices (t, s, noise, text dropout). ``autocast`` is the compute
    dtype under ``torch.autocast`` (None: fp32, or FSDP's own mixed precision)."""

    model: nn.Module
    ema: nn.Module
    objective: SelfEObjective
    optimizer: torch.optim.Optimizer
    grad_clip: float
    autocast: torch.dtype | None = None
    generator: torch.Generator | None = None


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards) and return it before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the norm is already reduced over ranks
        norm = norm.full_tensor()
    return float(norm)


def train_step(tr: Trainee, batch: Batch, null_cond: TextCond, step: int, lr: float,
               ema_decay: float) -> dict[str, float]:
    """Loss, backward, clip, Adam update, EMA update with ``ema_decay`` (``selfe.core.ema.ema_decay_at``).
    Returns the loss breakdown plus grad_norm and lr."""
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    device_type = batch.x0.device.type
    with torch.autocast(device_type, dtype=tr.autocast or torch.float32, enabled=tr.autocast is not None):
        out = tr.objective(tr.model, tr.ema, batch.x0, batch.cond, null_cond, step, batch.fake_cond, tr.generator)
    tr.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = clip_grad_norm(tr.model, tr.grad_clip)
    tr.optimizer.step()
    update_ema(tr.ema, tr.model, ema_decay)
    return {**out.stats, "grad_norm": grad_norm, "lr": lr}
