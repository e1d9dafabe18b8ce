"""The cache's key: a digest of every input that changes the cached rows, and the folder it names.

It hashes the source's *location*, not its contents, and not how the job runs (batch size, actor
count): see ``selfe.data.cache`` for the layout under that folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

from selfe.config import Config

FORMAT_VERSION = 2
"""Bump when the row schema or layout changes: every key changes with it. 2: per-build folders."""


@functools.lru_cache(maxsize=16)
def _model_identity(location: str) -> str:
    """Name plus content fingerprint for models on local disk; the location itself otherwise.

    S3 and hub models are not downloaded just to name the cache; their location stands for them.
    """
    from selfe.encoders.storage import MINILM, is_hub_id, model_id, resolve_model_dir

    if location == MINILM or (location and not location.startswith("s3://") and not is_hub_id(location)):
        return model_id(location, resolve_model_dir(location))
    return location


def cache_key(cfg: Config) -> str:
    """16-hex-digit digest of every input that changes the cached rows."""
    data, codec = cfg.data, cfg.codec
    shapes = data.source == "shapes"
    inputs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": "shapes" if shapes else _normalise_location(data.source),
        "resolution": data.resolution,
        "min_image_size": data.min_image_size,
        "codec": {
            "kind": codec.kind,
            "path": _model_identity(codec.path) if codec.kind != "pixels" else "",
            "scale": codec.scale,
            "shift": codec.shift,
            "sample": codec.sample,
            # Only when set, so that the keys of existing caches stay as they were.
            **({"pixel_downsample": codec.pixel_downsample} if codec.pixel_downsample != 1 else {}),
        },
        "text_encoder": _model_identity(cfg.text.name),
        "max_tokens": cfg.text.max_tokens,
    }
    if cfg.objective.fake_score:  # extra fake_* columns; caches without the term keep their old key
        inputs["fake_prompt_prefix"] = cfg.objective.fake_prompt_prefix
    if shapes:
        inputs |= {"num_samples": data.num_samples, "seed": data.seed, "task_weights": sorted(data.task_weights.items())}
    else:
        inputs |= {"source_format": data.source_format, "columns": [data.image_column, data.caption_column]}
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _normalise_location(uri: str) -> str:
    return uri.rstrip("/") if uri.startswith("s3://") else os.path.abspath(os.path.expanduser(uri))


def cache_dir(cfg: Config) -> str:
    """``<data.cache_root>/<cache_key(cfg)>`` (a local path or an s3:// URI)."""
    return f"{cfg.data.cache_root.rstrip('/')}/{cache_key(cfg)}"
