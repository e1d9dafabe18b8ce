"""Small in-memory datasets with the cache's schema, for Ray Train tests that do not need real data."""

from __future__ import annotations

import numpy as np
import ray
import torch

TEXT_LEN, TEXT_WIDTH = 8, 384


def synthetic_dataset(rows: int = 40, resolution: int = 32, seed: int = 0) -> ray.data.Dataset:
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


def null_text() -> dict[str, torch.Tensor]:
    return {"tokens": torch.zeros(1, TEXT_LEN, TEXT_WIDTH), "mask": torch.ones(1, TEXT_LEN, dtype=torch.bool),
            "pooled": torch.zeros(1, TEXT_WIDTH)}


TINY_OVERRIDES = [
    "--model.double_blocks=1", "--model.single_blocks=1", "--model.width=64", "--model.head_dim=16",
    "--train.batch_size=8", "--train.log_every=1", "--eval.steps=1", "--optim.warmup_steps=2",
]
