"""One optimiser step of Self-E / flow matching, shared by the single-process loop and the
Ray Train worker (so there is exactly one copy of the step logic)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfe.ema import update_ema
from selfe.objective import SelfEObjective, TextCond


@dataclass
class Batch:
    """x0 (B, C, H, W) clean latents; cond the captions' embeddings; fake_cond optional
    embeddings of "fake image " + caption for the fake-score term."""

    x0: torch.Tensor
    cond: TextCond
    fake_cond: TextCond | None = None


def mixed_precision_dtype(mode: str, device: torch.device | str) -> torch.dtype | None:
    """``train.mixed_precision`` -> the compute dtype: bf16 for "bf16", and for "auto" on CUDA; None
    (fp32) otherwise. On CPUs with AVX-512 BF16 "bf16" is an option too (oneDNN bf16 matmuls)."""
    if mode == "bf16" or (mode == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def lr_at(step: int, lr: float, lr_end: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up 0 -> lr over warmup_steps, then linear decay to lr_end at total_steps."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    frac = min(max(step - warmup_steps, 0) / span, 1.0)
    return lr + (lr_end - lr) * frac


def build_optimizer(model: nn.Module, lr: float, beta1: float, beta2: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam(W) over trainable parameters; foreach kernels work on sharded DTensors too."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, foreach=True)


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


def train_step(
    model: nn.Module,
    ema: nn.Module,
    objective: SelfEObjective,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    null_cond: TextCond,
    step: int,
    lr: float,
    grad_clip: float,
    ema_decay: float,
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Loss, backward, clip, Adam update, EMA update with ``ema_decay`` (``selfe.ema.ema_decay_at``).
    Returns the loss breakdown plus grad_norm and lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device_type = batch.x0.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = objective(model, ema, batch.x0, batch.cond, null_cond, step, batch.fake_cond, generator)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = clip_grad_norm(model, grad_clip)
    optimizer.step()
    update_ema(ema, model, ema_decay)
    return {**out.stats, "grad_norm": grad_norm, "lr": lr}
