"""The cache contract: the columns one row of the encoded cache holds, their shapes in the manifest,
and how rows become a training `Batch`. The writer (``transforms.EncodeBatch``, ``cache._finish``)
and every reader (the Ray Train worker, the plain loop, benchmarks, tests) go through this module.

One row: ``latent`` f16 (C, h, w) | ``text_tokens`` f16 (L, D) | ``text_mask`` bool (L,) |
``text_pooled`` f16 (Dp,) | ``caption`` str | ``spec`` str, plus ``fake_tokens`` / ``fake_mask`` /
``fake_pooled`` (the embeddings of "fake image " + caption) when the fake-score term is on.
"""

from __future__ import annotations


import torch

from selfe.core.types import Batch, TextCond

LATENT, CAPTION, SPEC = "latent", "caption", "spec"
TEXT_FIELDS = ("tokens", "mask", "pooled")
"""The `TextCond` fields, in the order of the text columns."""
TEXT_COLUMNS = tuple(f"text_{f}" for f in TEXT_FIELDS)
FAKE_COLUMNS = tuple(f"fake_{f}" for f in TEXT_FIELDS)
TENSOR_COLUMNS = (LATENT, *TEXT_COLUMNS)
STRING_COLUMNS = (CAPTION, SPEC)
"""Kept for people and data checks; ``iter_torch_batches`` cannot convert them, so training drops them."""


def manifest_columns(latent_shape: list[int], max_tokens: int, width: int, pooled_width: int,
                     fake: bool) -> dict[str, dict]:
    """The manifest's ``columns`` entry: {column: {"shape": [...], "dtype": ...}}."""
    text = {"tokens": {"shape": [max_tokens, width], "dtype": "float16"},
            "mask": {"shape": [max_tokens], "dtype": "bool"},
            "pooled": {"shape": [pooled_width], "dtype": "float16"}}
    columns = {LATENT: {"shape": list(latent_shape), "dtype": "float16"},
               **{f"text_{k}": v for k, v in text.items()},
               **{c: {"dtype": "string"} for c in STRING_COLUMNS}}
    if fake:
        columns.update({f"fake_{k}": v for k, v in text.items()})
    return columns


def latent_shape(manifest: dict) -> tuple[int, int, int]:
    """(C, h, w) of the cache's latents."""
    c, h, w = manifest["columns"][LATENT]["shape"]
    return int(c), int(h), int(w)


def training_columns(manifest: dict) -> list[str]:
    """The tensor columns a training batch needs: latent, text and (when present) fake-prompt columns."""
    return [c for c in (*TENSOR_COLUMNS, *FAKE_COLUMNS) if c in manifest["columns"]]


def _cond(rows: dict[str, torch.Tensor], prefix: str, device: torch.device | str) -> TextCond:
    return TextCond(*(rows[f"{prefix}{f}"] for f in TEXT_FIELDS)).to(device, torch.float32)


def text_cond(rows: dict[str, torch.Tensor]) -> TextCond:
    """The text columns of ``rows`` as a `TextCond` (float tokens and pooled, bool mask), on their device."""
    tokens, mask, pooled = (rows[c] for c in TEXT_COLUMNS)
    return TextCond(tokens.float(), mask.bool(), pooled.float())


def empty_text_columns(max_tokens: int, width: int, pooled_width: int) -> dict:
    """The text columns of zero rows, in the cache's dtypes (numpy)."""
    import numpy as np

    shapes = ((0, max_tokens, width), (0, max_tokens), (0, pooled_width))
    return {c: np.zeros(shape, dtype) for c, shape, dtype in zip(TEXT_COLUMNS, shapes, (np.float16, bool, np.float16))}


def batch_from_rows(rows: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> Batch:
    """Cache columns (any subset of rows) -> an fp32 `Batch` on ``device``.

    rows: latent (B, C, h, w), text_tokens (B, L, D), text_mask (B, L), text_pooled (B, Dp), and the
    fake_* columns when the cache has them.
    """
    fake = _cond(rows, "fake_", device) if FAKE_COLUMNS[0] in rows else None
    return Batch(rows["latent"].to(device, torch.float32), _cond(rows, "text_", device), fake)
