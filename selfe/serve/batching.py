"""Dynamic batching: requests with the same steps and guidance run as one batched forward.

Every image keeps the noise seed it would have alone (``noise_seeds(seed, n)`` of its own request), and
the sampler draws each row from its own generator, so a request's images do not depend on which other
requests shared its batch: the server, ``generate.py`` and the registered model agree image for image.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from selfe.core.types import TextCond
from selfe.generator import ImageGenerator, noise_seeds


@dataclass(frozen=True)
class Job:
    """One request's images: ``num_images`` of ``prompt`` with ``seed`` at (steps, guidance)."""

    prompt: str
    num_images: int
    seed: int
    steps: int
    guidance: float


@dataclass
class JobResult:
    images: np.ndarray  # (num_images, H, W, 3) uint8
    nfe: int
    batch_images: int  # images in the forward this job was part of
    truncated: bool  # the prompt was longer than the text encoder reads
    eta: float  # the sampler's eta at these steps (explicit or the per-step default)


class TextCache:
    """Least-recently-used prompt embeddings of one generator (cleared when it changes): a repeated
    prompt skips the text encoder. Each entry is one row, (1, L, D) tokens, padded to ``max_tokens``."""

    def __init__(self, size: int) -> None:
        self.size, self.hits, self.misses = size, 0, 0
        self._rows: OrderedDict[str, tuple[TextCond, bool]] = OrderedDict()
        self._owner: ImageGenerator | None = None

    def encode(self, gen: ImageGenerator, prompts: Sequence[str]) -> tuple[TextCond, list[bool]]:
        """Embeddings of ``prompts`` (B rows) and whether each was cut to the encoder's length."""
        if gen is not self._owner:
            self._rows.clear()
            self._owner = gen
        missing = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        if missing:
            cond, cut = gen.text.encode(missing), gen.text.truncated(missing).tolist()
            for i, prompt in enumerate(missing):
                self._rows[prompt] = (cond[i:i + 1], cut[i])
        rows = []
        for prompt in prompts:
            self._rows.move_to_end(prompt)
            rows.append(self._rows[prompt])
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return TextCond.concat([r[0] for r in rows]), [r[1] for r in rows]


def run_batch(gen: ImageGenerator, cache: TextCache, jobs: Sequence[Job], max_rows: int) -> list[JobResult]:
    """Images for every job: one sampling run per (steps, guidance) group, in chunks of at most
    ``max_rows`` images. Results in the order of ``jobs``."""
    groups: dict[tuple[int, float], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.steps, job.guidance), []).append(i)
    results: list[JobResult | None] = [None] * len(jobs)
    for (steps, guidance), members in groups.items():
        sc = gen.sampler(steps, guidance)
        prompts = [jobs[i].prompt for i in members for _ in range(jobs[i].num_images)]
        keys = [k for i in members for k in noise_seeds(jobs[i].seed, jobs[i].num_images)]
        cond, cut = cache.encode(gen, prompts)
        parts, nfe = [], 0
        for start in range(0, len(keys), max_rows):
            images, nfe = gen.sample_rows(cond[start:start + max_rows], keys[start:start + max_rows], sc)
            parts.append(images)
        images, row = np.concatenate(parts), 0
        for i in members:
            n = jobs[i].num_images
            results[i] = JobResult(images[row:row + n], nfe, min(len(keys), max_rows), cut[row], sc.eta)
            row += n
    return results  # type: ignore[return-value]
