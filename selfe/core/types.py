"""The data types the core exchanges with the layers around it: a batch of text conditions and a
training batch. Encoders produce them, the cache contract (``selfe.data.contract``) builds them from
rows, and the model, objective and sampler consume them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TextCond:
    """A batch of text conditions: tokens (B, L, Dt), mask (B, L) bool (True at real tokens; padding
    rows of ``tokens`` are zero), pooled (B, Dp)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __getitem__(self, idx) -> TextCond:
        return TextCond(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextCond:
        """On ``device``; tokens and pooled cast to ``dtype`` when given (the mask stays bool)."""
        return TextCond(self.tokens.to(device, dtype), self.mask.to(device, torch.bool), self.pooled.to(device, dtype))

    def expand(self, batch: int) -> TextCond:
        """Broadcast a single condition (1, ...) to ``batch`` rows."""
        return TextCond(
            self.tokens.expand(batch, -1, -1), self.mask.expand(batch, -1), self.pooled.expand(batch, -1)
        )

    def where(self, take_other: torch.Tensor, other: TextCond) -> TextCond:
        """Row-wise select: ``other`` where take_other (B,) is True, else self."""
        m = take_other.bool()
        return TextCond(
            torch.where(m[:, None, None], other.tokens, self.tokens),
            torch.where(m[:, None], other.mask, self.mask),
            torch.where(m[:, None], other.pooled, self.pooled),
        )

    def cat(self, other: TextCond) -> TextCond:
        return TextCond.concat([self, other])

    @staticmethod
    def concat(parts: Sequence[TextCond]) -> TextCond:
        """The rows of ``parts`` one after another (B = the sum of their batches)."""
        return TextCond(*(torch.cat([getattr(p, name) for p in parts]) for name in ("tokens", "mask", "pooled")))


@dataclass
class Batch:
    """x0 (B, C, H, W) clean latents; cond the captions' embeddings; fake_cond optional embeddings
    of "fake image " + caption for the fake-score term."""

    x0: torch.Tensor
    cond: TextCond
    fake_cond: TextCond | None = None
