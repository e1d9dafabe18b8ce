"""Sample grids as PNG bytes, with no MLflow import: ``generate.py`` writes a PNG from a local model
folder with these alone; ``log_grids`` hands the PNG to a run logger."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def log_grids(logger, grids: dict[int, np.ndarray], step: int, codec_cfg: Any = None) -> None:
    """Sample grids (rows = step counts, columns = prompts) as one PNG artifact per logging step."""
    images = {k: _to_uint8(v, codec_cfg) for k, v in grids.items()}
    logger.log_artifact_bytes(png_bytes(grid_image(images)), f"samples/grid_step{step:07d}.png")


def _to_uint8(latents: np.ndarray, codec_cfg: Any) -> np.ndarray:
    import torch

    from selfe.encoders.image import CodecConfig, tensor_to_images

    codec = codec_for(codec_cfg or CodecConfig())
    return tensor_to_images(codec.decode(torch.from_numpy(latents)))


def codec_for(codec_cfg: Any) -> Any:
    """The codec of ``codec_cfg``, built once per process and configuration (a VAE load per grid would
    dominate a GPU run's logging)."""
    from selfe.encoders.image import build_codec

    key = repr(codec_cfg)
    if key not in _CODECS:
        _CODECS[key] = build_codec(codec_cfg)
    return _CODECS[key]


_CODECS: dict[str, Any] = {}


def grid_image(rows: dict[int, np.ndarray], pad: int = 2) -> np.ndarray:
    """{steps: (N, H, W, 3) uint8} -> one (rows*(H+pad), N*(W+pad), 3) uint8 image, rows in step order."""
    keys = sorted(rows)
    n, h, w, _ = rows[keys[0]].shape
    out = np.full((len(keys) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, k in enumerate(keys):
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = rows[k][c]
    return out


def png_bytes(image: np.ndarray, scale: int = 4) -> bytes:
    from PIL import Image

    img = Image.fromarray(image)
    if scale > 1:  # 32x32 samples are unreadable at 1:1
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
