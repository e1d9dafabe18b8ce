"""A plain single-process training loop over any iterator of batches.

Used by unit tests, benchmarks and as the reference the Ray Train worker is compared with; the
step itself lives in ``selfe.train.step``.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from torch import nn

from selfe.config import Config
from selfe.core.ema import ema_decay_at, make_ema
from selfe.core.model import build_model
from selfe.core.objective import SelfEObjective
from selfe.core.types import Batch, TextCond
from selfe.train.parallel import compile_blocks
from selfe.train.step import Trainee, build_optimizer, lr_at, mixed_precision_dtype, train_step


def train_local(
    cfg: Config,
    batches: Iterator[Batch],
    null_cond: TextCond,
    image_tokens: int,
    steps: int | None = None,
    device: str = "cpu",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop: Callable[[], bool] | None = None,
    on_ema: Callable[[int, nn.Module], None] | None = None,
) -> tuple[nn.Module, nn.Module, list[dict[str, float]]]:
    """Train ``cfg.model`` for ``steps`` (default cfg.train.steps) and return (model, ema, per-step stats).
    ``image_tokens``: tokens per image of the batches' latents (``cfg.model.num_tokens(h, w)``).

    ``stop`` is asked after every step; True ends training early (a time budget). The schedules
    (learning rate, tau) still run over ``steps``. ``on_ema(step, ema)`` sees the EMA model after
    every step (snapshots of a long run)."""
    torch.manual_seed(cfg.train.seed)
    total = steps or cfg.train.steps
    model = build_model(cfg.model, device)
    ema = make_ema(model)
    if cfg.train.compile:
        compile_blocks(model, cfg.train.compile_backend)
        compile_blocks(ema, cfg.train.compile_backend)
    tr = Trainee(model, ema, SelfEObjective(cfg.objective, image_tokens), build_optimizer(model, cfg.optim),
                 cfg.optim.grad_clip, mixed_precision_dtype(cfg.train.mixed_precision, device),
                 torch.Generator(device).manual_seed(cfg.train.seed + 1))
    history: list[dict[str, float]] = []
    model.train()
    for step in range(total):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        stats = train_step(tr, batch, null_cond, step, lr_at(step, cfg.optim, total),
                           ema_decay_at(step, cfg.ema, cfg.train.batch_size))
        stats.update(step=step, data_s=t1 - t0, step_s=time.perf_counter() - t0)
        history.append(stats)
        if on_step is not None:
            on_step(step, stats)
        if on_ema is not None:
            on_ema(step, ema)
        if stop is not None and stop():
            break
    return model, ema, history
