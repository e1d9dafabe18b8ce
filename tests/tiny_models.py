"""Tiny random models for tests that load, register or serve one (no training)."""

from __future__ import annotations

import torch

from selfe.config import load_config
from selfe.core.model import build_model
from selfe.generator import save_model_dir

TINY = ["--model.double_blocks=1", "--model.single_blocks=1", "--model.width=32", "--model.head_dim=16"]


def save_tiny_model(path, overrides=(), seed=0):
    """A random tiny model with every weight nudged: adaLN-zero would otherwise make V = 0 everywhere."""
    cfg = load_config(overrides=[*TINY, *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_model_dir(path, model, cfg)
