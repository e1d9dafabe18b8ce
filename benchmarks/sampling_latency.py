"""Sampling latency of the any-step sampler: per step and per image, at several step counts and batches.

    python benchmarks/sampling_latency.py                          # tiny preset, CPU
    python benchmarks/sampling_latency.py --device cuda --preset 0.5b --model.double_blocks=2 --model.single_blocks=4

Times ``selfe.core.sampling.sample`` on pre-encoded prompts (the text encoder runs once per prompt and is
timed separately), with the default EP-CFG (two branches batched in one forward: 2 NFE per step)
and with guidance off (1 NFE per step). Weights are random: latency does not depend on them.
Median of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from selfe.config import load_config
from selfe.bench.latency import random_conditions, time_sampling


def _conditions(cfg) -> tuple:
    """64 text conditions and the encoder's ms per prompt: the bundled encoder, timed as the generator
    runs it; for production widths (T5) random embeddings of the right shape (time: nan)."""
    from selfe.encoders.text import TextEncoder

    prompts = ["a photo of a red circle", "a blue square to the left of a green triangle"]
    if cfg.model.text_width == 384:
        encoder = TextEncoder(cfg.text)
        encoder.encode(prompts)  # warm-up
        t0 = time.perf_counter()
        base = encoder.encode(prompts * 32)
        text_ms = (time.perf_counter() - t0) * 1000 / 64
    else:
        base = random_conditions(cfg, 64)
        text_ms = float("nan")
    return base, text_ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1,2,4,8,50")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(overrides=overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    from selfe.core.model import build_model

    device = torch.device(args.device)
    model = build_model(cfg.model, device).eval()  # bf16 runs under autocast, as the generator's caller would
    side = cfg.data.resolution // (8 if cfg.codec.kind != "pixels" else cfg.codec.pixel_downsample)
    base, text_ms = _conditions(cfg)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {side}x{side}x{cfg.model.in_channels} "
          f"latent, patch {cfg.model.patch_size}, {args.device} {args.dtype}, {torch.get_num_threads()} threads; "
          f"text encoder {text_ms:.1f} ms/prompt")
    print("| batch | steps | guidance | NFE | ms / batch | ms / step | ms / image |")
    print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        idx = torch.arange(batch) % base.tokens.shape[0]
        cond, null = base[idx].to(device), base[:1].to(device)
        for steps in [int(s) for s in args.steps.split(",")]:
            for omega in (cfg.sampler.guidance, 1.0):
                ms, nfe = time_sampling(model, cfg, cond, null, side, steps, omega, device, args.dtype, args.repeats)
                print(f"| {batch} | {steps} | {omega:g} | {nfe} | {ms:.1f} | {ms / steps:.2f} | {ms / batch:.2f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
