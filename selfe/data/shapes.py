"""The shapes world: procedurally rendered flat-colour scenes with GenEval-style captions.

One import point for the training pipeline and the evaluation. Specs and captions live in
``shapes_spec``, rasterisation in ``shapes_render``; this module draws whole samples.

Sample ``i`` of seed ``s`` depends only on ``(s, i)``, so shards can be generated independently
and in any order. Spec, caption wording and layout use separate random streams, so turning
paraphrasing off changes the captions and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from selfe.data.shapes_render import render
from selfe.data.shapes_spec import (
    BACKGROUND,
    COLORS,
    COUNT_WORDS,
    HELDOUT_COMBOS,
    HELDOUT_POSITION_PAIRS,
    RELATIONS,
    SHAPES,
    TASKS,
    ShapesConfig,
    caption_for,
    is_heldout,
    sample_spec,
    spec_from_json,
    spec_to_json,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "COUNT_WORDS",
    "HELDOUT_COMBOS",
    "HELDOUT_POSITION_PAIRS",
    "RELATIONS",
    "SHAPES",
    "TASKS",
    "ShapesConfig",
    "caption_for",
    "generate",
    "generate_one",
    "is_heldout",
    "render",
    "sample_spec",
    "spec_from_json",
    "spec_to_json",
]


def generate_one(index: int, seed: int, cfg: ShapesConfig) -> tuple[np.ndarray, str, dict]:
    """Sample ``index`` of the stream ``seed``: (HxWx3 uint8 image, caption, spec)."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    spec_rng, caption_rng, layout_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence([seed, index]).spawn(3)
    )
    spec = sample_spec(spec_rng, cfg)
    caption = caption_for(spec, caption_rng if cfg.paraphrase else None)
    return render(spec, cfg.resolution, layout_rng), caption, spec


def generate(n: int, seed: int, cfg: ShapesConfig) -> Iterator[tuple[np.ndarray, str, dict]]:
    """Samples 0 .. n-1 of the stream ``seed``; item ``i`` equals ``generate_one(i, seed, cfg)``."""
    for index in range(n):
        yield generate_one(index, seed, cfg)
