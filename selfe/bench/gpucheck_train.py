"""Section train_shapes of ``benchmarks/gpu_check.py``: a short Self-E training on the shapes world with the plain
loop (``selfe.train.local``: no Ray, no MLflow), then GenEval-lite of the EMA model at a few step counts.

The shapes are rendered and encoded in this process (the bundled MiniLM, the pixel codec) and held in
memory; nothing is written to the cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from selfe.config import Config, load_config
from selfe.core.types import Batch, TextCond
from selfe.encoders.image import ImageCodec, build_codec
from selfe.encoders.text import TextEncoder
from selfe.bench.gpucheck import Profile


def encode_shapes(cfg: Config, n: int, codec: ImageCodec, text: TextEncoder) -> dict[str, torch.Tensor]:
    """Samples 0 .. n-1 of the shapes world (``data.seed``, ``data.resolution``) as the cache's tensor
    columns (latent, text_tokens, text_mask, text_pooled) on the CPU, encoded as preprocessing does."""
    from selfe.data.shapes import ShapesConfig, generate
    from selfe.data.transforms import CaptionEmbeddings, encode_arrays

    samples = list(generate(n, cfg.data.seed, ShapesConfig(resolution=cfg.data.resolution)))
    images = np.stack([image for image, _, _ in samples])
    columns = encode_arrays(images, [caption for _, caption, _ in samples], codec, CaptionEmbeddings(text))
    columns.pop("truncated")
    return {name: torch.from_numpy(values) for name, values in columns.items()}


def device_batches(rows: dict[str, torch.Tensor], batch_size: int, seed: int,
                   device: torch.device) -> Iterator[Batch]:
    """``selfe.data.loader.epoch_batches`` (reshuffled every epoch) moved to ``device``."""
    from selfe.data.loader import epoch_batches

    for batch in epoch_batches(rows, batch_size, seed):
        yield Batch(batch.x0.to(device, non_blocking=True), batch.cond.to(device), None)


def train_config(profile: Profile, extra_overrides: list[str] | None = None) -> Config:
    """The tiny preset with the profile's train_shapes overrides; ``train.steps`` sets the schedules'
    length (warm-up, decay, tau horizon) to the steps actually run."""
    return load_config(preset="tiny", overrides=[*profile.train_overrides, f"--train.steps={profile.train_steps}",
                                                 *(extra_overrides or [])])


def _train(cfg: Config, rows: dict[str, torch.Tensor], null: TextCond, device: torch.device,
           deadline: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Plain-loop Self-E training; stops early at ``deadline`` (perf_counter seconds)."""
    from selfe.train.local import train_local

    tokens = cfg.model.num_tokens(*rows["latent"].shape[-2:])
    batches = device_batches(rows, cfg.train.batch_size, cfg.train.seed, device)
    t0 = time.perf_counter()
    model, ema, history = train_local(cfg, batches, null, tokens, device=str(device),
                                      stop=lambda: time.perf_counter() > deadline)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    steps = len(history)
    # Steady state: the median step after the first tenth (allocator and autotuning warm-up).
    steady = sorted(h["step_s"] for h in history[steps // 10:])
    step_s = steady[len(steady) // 2]
    params = sum(p.numel() for p in model.parameters())
    tail = history[-max(steps // 10, 1):]
    return ema, {"steps": steps, "planned_steps": cfg.train.steps, "batch": cfg.train.batch_size,
                 "params_M": round(params / 1e6, 3), "image_tokens": tokens, "train_s": round(train_s, 2),
                 "images_per_s": round(steps * cfg.train.batch_size / train_s, 2),
                 "steady_images_per_s": round(cfg.train.batch_size / step_s, 2),
                 "first_loss": round(history[0]["loss"], 4),
                 "final_loss": round(sum(h["loss"] for h in tail) / len(tail), 4)}


def _geneval(cfg: Config, ema: torch.nn.Module, text: TextEncoder, codec: ImageCodec, device: torch.device,
             profile: Profile) -> list[dict[str, Any]]:
    """GenEval-lite of ``ema`` at each of the profile's step counts on the first
    ``eval_max_per_task`` prompts per (task, split), with the config's sampler."""
    from selfe.eval.runner import evaluate_steps, select_prompts
    from selfe.generator import ImageGenerator

    records = select_prompts(cfg.eval.prompt_set, max_per_task=profile.eval_max_per_task)
    gen = ImageGenerator(ema, cfg, text=text, codec=codec, device=device)
    rows = []
    for steps in profile.eval_steps:
        t0 = time.perf_counter()
        summary = evaluate_steps(gen, records, [steps], seed=cfg.eval.seed)[steps]
        seconds = time.perf_counter() - t0
        heldout = summary["heldout"]
        rows.append({"steps": steps, "nfe": summary["nfe"], "overall": round(summary["overall"], 4),
                     "heldout": None if heldout is None else round(heldout, 4), "prompts": len(records),
                     "seconds": round(seconds, 2), "images_per_s": round(len(records) / seconds, 2)})
    return rows


def train_and_score(profile: Profile, device: torch.device, deadline: float,
                    extra_overrides: list[str] | None = None) -> dict[str, Any]:
    """Section train_shapes: render and encode ``train_samples`` shapes scenes, train ``train_steps`` Self-E
    steps (bf16 autocast on CUDA) and score the EMA model with GenEval-lite.

    images_per_s: training images over the training wall time (data transfer included);
    steady_images_per_s: batch over the median step time; per step count of GenEval-lite: overall
    accuracy, held-out accuracy, NFE per image and generated images per second (text encoding,
    sampling, decoding and scoring)."""
    cfg = train_config(profile, extra_overrides)
    t0 = time.perf_counter()
    codec = build_codec(cfg.codec, device=device)
    text = TextEncoder(cfg.text, device=device)  # fp32: the generator feeds its output to an fp32 model
    rows = encode_shapes(cfg, profile.train_samples, codec, text)
    data_s = time.perf_counter() - t0
    null = text.encode([""])
    ema, train = _train(cfg, rows, null, device, deadline)
    geneval = _geneval(cfg, ema, text, codec, device, profile)
    side = cfg.data.resolution
    return {"images": f"{side}x{side} pixels, latent {tuple(rows['latent'].shape[1:])}",
            "model": {"width": cfg.model.width, "head_dim": cfg.model.head_dim,
                      "double_blocks": cfg.model.double_blocks, "single_blocks": cfg.model.single_blocks,
                      "patch": cfg.model.patch_size},
            "samples": profile.train_samples, "data_s": round(data_s, 2),
            "mixed_precision": cfg.train.mixed_precision, **train, "rows": geneval}
