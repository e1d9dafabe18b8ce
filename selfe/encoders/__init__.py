"""Frozen encoders: text (transformers) and image codecs (pixels, diffusers AutoencoderKL).

Imports neither Ray nor MLflow, so preprocessing actors, training workers and tests share them.
"""

from selfe.encoders.image import (
    AutoencoderKLCodec,
    CodecConfig,
    ImageCodec,
    PixelCodec,
    build_codec,
    images_to_tensor,
    tensor_to_images,
)
from selfe.encoders.storage import MINILM, fingerprint_model_dir, resolve_model_dir
from selfe.encoders.text import TextEncoder, TextEncoderConfig

__all__ = [
    "MINILM",
    "AutoencoderKLCodec",
    "CodecConfig",
    "ImageCodec",
    "PixelCodec",
    "TextEncoder",
    "TextEncoderConfig",
    "build_codec",
    "fingerprint_model_dir",
    "images_to_tensor",
    "resolve_model_dir",
    "tensor_to_images",
]
