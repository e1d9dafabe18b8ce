"""Sampling latency: wall time of ``selfe.core.sampling.sample`` at one (batch, steps, guidance) setting.

Shared by ``benchmarks/sampling_latency.py`` (the latency table) and ``benchmarks/gpu_check.py``.
Weights and prompts may be random: latency does not depend on them.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from selfe.config import Config
from selfe.core.sampling import resolve_sampler, sample
from selfe.core.types import TextCond


def random_conditions(cfg: Config, n: int) -> TextCond:
    """``n`` random text conditions of the model's text shapes (all ``text.max_tokens`` tokens real)."""
    tokens = cfg.text.max_tokens
    return TextCond(torch.randn(n, tokens, cfg.model.text_width), torch.ones(n, tokens, dtype=torch.bool),
                    torch.randn(n, cfg.model.pooled_width))


def time_sampling(model: nn.Module, cfg: Config, cond: TextCond, null: TextCond, side: int, steps: int,
                  guidance: float, device: torch.device, dtype: str = "fp32",
                  repeats: int = 3) -> tuple[float, int]:
    """(median milliseconds to sample one batch, NFE per image) for ``steps`` steps at ``guidance``.

    One batch is ``cond.tokens.shape[0]`` images of ``side`` x ``side`` latents on ``device``; the
    median is over ``repeats`` runs after one warm-up run (the first pays allocator and kernel
    selection). With guidance != 1 EP-CFG batches both branches in one forward: 2 NFE per step.
    ``dtype`` "bf16" runs under autocast, as the generator's caller would."""
    batch = cond.tokens.shape[0]
    sc = resolve_sampler(replace(cfg.sampler, guidance=guidance), cfg.objective.method, steps)
    times, nfe = [], 0
    for i in range(repeats + 1):
        g = torch.Generator(device).manual_seed(i)
        noise = torch.randn(batch, cfg.model.in_channels, side, side, generator=g, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16"):
            _, nfe = sample(model, noise, cond, null, sc, cfg.shift_mu((side, side)), generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000, nfe
