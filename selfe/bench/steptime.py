"""Step-time benchmark: flow matching vs Self-E on the same model and batch.

    python -m selfe.bench [--preset tiny] [--batch 32] [--steps 10] [--device cpu|cuda] [--dtype fp32|bf16]

Prints params, tokens per image, step time of each method, their ratio (the method predicts
~1.33x), images/s, and MFU on a GPU with a known peak. Random tensors stand in for data: the
step cost does not depend on their content.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from selfe.config import load_config
from selfe.core.ema import make_ema
from selfe.core.model import build_model
from selfe.core.objective import SelfEObjective
from selfe.core.types import Batch, TextCond
from selfe.perf import device_peak_flops, mfu, train_flops_per_image
from selfe.train.step import Trainee, build_optimizer, train_step


def random_batch(cfg, batch: int, res: int, n_txt: int, device) -> tuple[Batch, TextCond]:
    c = cfg.model
    x0 = torch.randn(batch, c.in_channels, res, res, device=device).clamp(-1, 1)
    mask = torch.zeros(batch, n_txt, dtype=torch.bool, device=device)
    mask[:, :12] = True  # a typical short caption
    cond = TextCond(torch.randn(batch, n_txt, c.text_width, device=device), mask,
                    torch.randn(batch, c.pooled_width, device=device))
    null = TextCond(torch.randn(1, n_txt, c.text_width, device=device), mask[:1].clone(),
                    torch.randn(1, c.pooled_width, device=device))
    return Batch(x0, cond), null


def bench_trainee(cfg, method: str, image_tokens: int, device, dtype: str) -> Trainee:
    """A fresh model, EMA, objective and optimizer for step timing: ``method`` with tau = 1 from the
    start (the full Self-E cost), seed 0, bf16 autocast when ``dtype`` is "bf16"."""
    cfg.objective.method = method
    cfg.objective.anneal_steps = 0
    torch.manual_seed(0)
    model = build_model(cfg.model, device)
    ema = make_ema(model)
    return Trainee(model, ema, SelfEObjective(cfg.objective, image_tokens), build_optimizer(model, cfg.optim), 1.0,
                   torch.bfloat16 if dtype == "bf16" else None)


def timed_steps(tr: Trainee, data: Batch, null: TextCond, n: int, device) -> list[float]:
    """Seconds of each of ``n`` optimiser steps (synchronised on CUDA)."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(tr, data, null, 10_000, 1e-4, 0.999)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def time_method(cfg, method: str, batch: int, res: int, n_txt: int, steps: int, device, dtype) -> float:
    """Median seconds per optimiser step of ``method`` after 3 warm-up steps."""
    data, null = random_batch(cfg, batch, res, n_txt, device)
    tr = bench_trainee(cfg, method, cfg.model.num_tokens(res, res), device, dtype)
    timed_steps(tr, data, null, 3, device)
    times = sorted(timed_steps(tr, data, null, steps, device))
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=32, help="input side (pixels or latent cells)")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. --model.double_blocks=2")
    args, extra = ap.parse_known_args(argv)
    cfg = load_config(preset=args.preset, overrides=extra + args.overrides)
    device = torch.device(args.device)
    n_img = cfg.model.num_tokens(args.resolution, args.resolution)
    fm = time_method(cfg, "flow_matching", args.batch, args.resolution, args.text_tokens, args.steps, device, args.dtype)
    se = time_method(cfg, "self_e", args.batch, args.resolution, args.text_tokens, args.steps, device, args.dtype)
    params = sum(p.numel() for p in build_model(cfg.model, "meta").parameters())
    peak = device_peak_flops(device, args.dtype)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "preset": args.preset, "params_M": round(params / 1e6, 2), "tokens_per_image": n_img,
        "batch": args.batch, "dtype": args.dtype,
        "fm_step_s": round(fm, 4), "self_e_step_s": round(se, 4), "self_e_over_fm": round(se / fm, 3),
        "fm_images_per_s": round(args.batch / fm, 1), "self_e_images_per_s": round(args.batch / se, 1),
    }
    for name, t, method in (("fm", fm, "flow_matching"), ("self_e", se, "self_e")):
        flops = train_flops_per_image(cfg.model, n_img, args.text_tokens, method, cfg.objective.p_s_equals_t)
        m = mfu(flops * args.batch / t, peak)
        if m is not None:
            result[f"{name}_mfu"] = round(m, 4)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
