"""Small in-memory datasets with the cache's schema, for Ray Train tests that do not need real data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from selfe.core.types import TextCond
from selfe.train.handoff import WorkerInputs

TEXT_LEN, TEXT_WIDTH = 8, 384


def synthetic_dataset(rows: int = 40, resolution: int = 16, seed: int = 0) -> ray.data.Dataset:
    """Rows whose latent is a flat colour chosen by a one-hot 'caption': learnable in a few steps."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(rows):
        label = i % 4
        latent = np.zeros((3, resolution, resolution), np.float16)
        latent[label % 3] = 0.8 if label < 3 else -0.8
        tokens = np.zeros((TEXT_LEN, TEXT_WIDTH), np.float16)
        tokens[:, label] = 1.0
        tokens += rng.normal(0, 0.01, tokens.shape).astype(np.float16)
        items.append({"latent": latent, "text_tokens": tokens, "text_mask": np.arange(TEXT_LEN) < 4,
                      "text_pooled": tokens[0].copy(), "caption": f"class {label}", "spec": ""})
    return ray.data.from_items(items)


def null_text() -> TextCond:
    return TextCond(torch.zeros(1, TEXT_LEN, TEXT_WIDTH), torch.ones(1, TEXT_LEN, dtype=torch.bool),
                    torch.zeros(1, TEXT_WIDTH))


def inputs(cfg, resolution: int = 16, **kw) -> WorkerInputs:
    """The workers' hand-off for `synthetic_dataset` rows (no grids, no periodic evaluation, no MLflow)."""
    return WorkerInputs(cfg, null_text(), (3, resolution, resolution), **kw)


TINY_OVERRIDES = [
    "--model.double_blocks=1", "--model.single_blocks=1", "--model.width=64", "--model.head_dim=16",
    "--train.batch_size=8", "--train.log_every=1", "--eval.steps=1", "--optim.warmup_steps=2",
    "--train.compile=false",  # the tiny preset compiles: minutes of inductor for a few steps
]


def save_tiny_vae(path: Path, seed: int) -> str:
    """A randomly initialised 2-level diffusers AutoencoderKL (4 latent channels, 2x downsampling)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    vae.save_pretrained(path)
    return str(path)


def image_bytes(size: tuple[int, int] = (48, 40), mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    """Encoded random pixels: ``size`` (w, h), PIL ``mode``, file format ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()
