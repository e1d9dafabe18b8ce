"""One optimiser step of Self-E / flow matching, shared by the single-process loop and the
Ray Train worker (so there is exactly one copy of the step logic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
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


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all shards) and return it before clipping (0-dim, on the
    device: reading it is left to the caller)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the norm is already reduced over ranks
        norm = norm.full_tensor()
    return norm


def split_rows(n: int, parts: int, i: int) -> tuple[int, int]:
    """Rows [lo, hi) of part ``i`` when ``n`` rows split into ``parts`` as evenly as they go: the first
    ``n % parts`` parts get one row more (16 rows over 3 workers: 6, 5, 5)."""
    base, extra = divmod(n, parts)
    lo = i * base + min(i, extra)
    return lo, lo + base + (1 if i < extra else 0)


@dataclass(frozen=True)
class Share:
    """One worker's part of a global batch of ``batch_size`` rows split over ``world`` workers, run as
    ``micro_batches`` forward/backward passes of at most ``micro_batch_size`` rows (0: one pass)."""

    batch_size: int
    world: int = 1
    rank: int = 0
    micro_batch_size: int = 0

    @property
    def rows(self) -> tuple[int, int]:
        """This worker's rows [lo, hi) of the global batch."""
        return split_rows(self.batch_size, self.world, self.rank)

    @property
    def micro_batches(self) -> int:
        """Passes per step, the same on every worker (sharded collectives run in lockstep): enough for
        the largest share."""
        largest = -(-self.batch_size // self.world)
        return -(-largest // self.micro_batch_size) if self.micro_batch_size else 1


def train_step(tr: Trainee, batch: Batch, null_cond: TextCond, step: int, lr: float,
               ema_decay: float, share: Share | None = None) -> dict[str, float]:
    """Loss, backward, clip, Adam update, EMA update with ``ema_decay`` (``selfe.core.ema.ema_decay_at``).
    ``batch`` holds this worker's rows of the global batch (``share``; default: the whole batch, one
    worker). Returns the loss breakdown plus grad_norm and lr.

    The step is the same optimisation whatever the split: every worker draws the global batch's random
    choices from the same generator state (``SelfEObjective.draw_batch``) and keeps its rows, each pass
    adds sum_b loss_b * W / B to the gradients (FSDP averages them over the W workers: the mean over
    the B rows), and gradient accumulation over micro-batches syncs once, at the last pass. A worker
    whose share is shorter than the pass count runs a zero-weight pass on one row instead of an empty
    one, so every worker runs the same collectives. ``loss`` is the global batch's loss on every worker."""
    share = share or Share(batch.x0.shape[0])
    lo, hi = share.rows
    if batch.x0.shape[0] != hi - lo:
        raise ValueError(f"worker {share.rank} of {share.world} holds {batch.x0.shape[0]} rows of a global batch of "
                         f"{share.batch_size}; its share is {hi - lo}")
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    draws = tr.objective.draw_batch((share.batch_size, *batch.x0.shape[1:]), step, batch.x0.device, tr.generator)
    fake_normalizer = max(len(draws.eval_rows or ()), 1) / share.world
    draws = draws.rows(lo, hi)
    tr.optimizer.zero_grad(set_to_none=True)
    # Sums stay on the device until the step's one read at the end: a read between forward and
    # backward would leave a GPU idle while the host queues the backward.
    passes, contribution, weighted = share.micro_batches, torch.zeros((), dtype=torch.float64, device=batch.x0.device), {}
    syncs = hasattr(tr.model, "set_requires_gradient_sync")  # FSDP2: reduce-scatter at the last pass only
    for i in range(passes):
        a, b = split_rows(hi - lo, passes, i)
        weight = 1.0
        if a == b:
            a, b, weight = 0, 1, 0.0
        if syncs:
            tr.model.set_requires_gradient_sync(i == passes - 1)
        fake = None if batch.fake_cond is None else batch.fake_cond[a:b]
        with torch.autocast(batch.x0.device.type, dtype=tr.autocast or torch.float32, enabled=tr.autocast is not None):
            out = tr.objective(tr.model, tr.ema, batch.x0[a:b], batch.cond[a:b], null_cond, step, fake, tr.generator,
                               draws.rows(a, b), normalizer=share.batch_size / share.world,
                               fake_normalizer=fake_normalizer)
        (out.loss * weight if weight != 1.0 else out.loss).backward()
        contribution += out.loss.detach().double() * weight
        for k, v in out.stats.items():  # this worker's other statistics: row-weighted over its passes
            v = torch.as_tensor(v, dtype=torch.float64, device=batch.x0.device)
            rows = (b - a) * weight * (~v.isnan())  # a t bin without rows in a pass counts nothing
            total, count = weighted.get(k, (0.0, 0.0))
            weighted[k] = (total + v.nan_to_num() * rows, count + rows)
    grad_norm = clip_grad_norm(tr.model, tr.grad_clip)
    tr.optimizer.step()
    update_ema(tr.ema, tr.model, ema_decay)
    names = [*weighted, "loss", "grad_norm"]
    values = [total / count for total, count in weighted.values()]  # NaN: no rows in any pass
    values += [global_mean(contribution, share.world), grad_norm.double()]
    read = dict(zip(names, torch.stack(values).tolist()))  # the step's one read at its end
    stats = {k: v for k, v in read.items() if v == v}
    return {**stats, "lr": lr}


def global_mean(contribution: torch.Tensor, world: int) -> torch.Tensor:
    """The global batch's loss from each worker's ``contribution`` (its passes' losses, already scaled
    by W / B, float64 on the device: NCCL reduces device tensors only): their sum over workers / W."""
    if world > 1 and dist.is_initialized():
        contribution = contribution.clone()
        dist.all_reduce(contribution)
        return contribution / world
    return contribution
