"""Image codecs: map [-1, 1] images to the space the diffusion model works in, and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from selfe.encoders.storage import load_pretrained, model_id, resolve_model_dir


@dataclass
class CodecConfig:
    """Which image codec to use."""

    kind: str = "pixels"
    """``"pixels"`` (identity) or ``"autoencoder_kl"`` (a diffusers VAE)."""
    path: str = ""
    """For ``autoencoder_kl``: a local dir, an ``s3://`` prefix or a hub id (``owner/name[/subfolder]``)."""
    scale: float | None = None
    """Latent scale; None takes the VAE config's ``scaling_factor`` (FLUX: 0.3611)."""
    shift: float | None = None
    """Latent shift; None takes the VAE config's ``shift_factor``, or 0 if it has none (FLUX: 0.1159)."""
    sample: bool = False
    """Encode to a sample of the VAE posterior instead of its mean."""
    pixel_downsample: int = 1
    """For ``pixels``: 1 is the identity. f > 1: the model works on f x f average-pooled pixels, and
    decoding upsamples bilinearly. At f = 2 the round trip keeps GenEval-lite's ground truth at 1.000
    (``benchmarks/halfres_upper_bound.py``) while a 16x16 model needs a quarter of the values. [ours]"""


class ImageCodec(ABC):
    """Maps images (B, 3, H, W) in [-1, 1] to latents (B, channels, H/downsample, W/downsample) and back.

    Latents are normalised: ``latent = (z - shift) * scale`` where ``z`` is the raw codec output.

    Attributes:
        id: stable identifier of the codec and its weights, for cache keys.
        channels: latent channels C.
        downsample: spatial factor f between image and latent.
        scale: multiplier applied after the shift.
        shift: subtracted from the raw latent before scaling.
    """

    id: str
    channels: int
    downsample: int
    scale: float
    shift: float

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) normalised latents."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised latents -> (B, 3, h*f, w*f) images clamped to [-1, 1]."""

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the codec's downsample factor "
                f"{self.downsample}; resize or crop the images first"
            )


class PixelCodec(ImageCodec):
    """Pixels: the identity (``downsample`` 1), or f x f average pooling with a bilinear way back."""

    channels = 3
    scale = 1.0
    shift = 0.0

    def __init__(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, downsample: int = 1
    ) -> None:
        if downsample < 1:
            raise ValueError(f"codec.pixel_downsample must be >= 1, got {downsample}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.downsample = downsample
        self.id = "pixels" if downsample == 1 else f"pixels/{downsample}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, H/f, W/f) on the codec's device and dtype (the same images at f = 1)."""
        self._check_images(images)
        images = images.to(self.device, self.dtype)
        return images if self.downsample == 1 else F.avg_pool2d(images, self.downsample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, 3, h*f, w*f) clamped to [-1, 1]."""
        images = latents.to(self.device, self.dtype)
        if self.downsample > 1:
            images = F.interpolate(images, scale_factor=self.downsample, mode="bilinear", align_corners=False)
        return images.clamp(-1.0, 1.0)


class AutoencoderKLCodec(ImageCodec):
    """A frozen diffusers ``AutoencoderKL`` (SD, SDXL, FLUX VAEs)."""

    def __init__(
        self, cfg: CodecConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from diffusers import AutoencoderKL

        if not cfg.path:
            raise ValueError("codec kind 'autoencoder_kl' needs `path`: a local dir, s3:// prefix or hub id")
        resolved = resolve_model_dir(cfg.path)
        vae = load_pretrained(AutoencoderKL.from_pretrained, resolved, torch_dtype=dtype)
        self._attach(cfg, vae, device, f"autoencoder_kl:{model_id(cfg.path, resolved)}")

    @classmethod
    def from_loaded(cls, cfg: CodecConfig, vae, device: str | torch.device = "cpu",
                    id: str = "autoencoder_kl:loaded") -> AutoencoderKLCodec:
        """Around an ``AutoencoderKL`` someone else loaded (a diffusers pipeline's ``vae``)."""
        codec = cls.__new__(cls)
        codec._attach(cfg, vae, device, id)
        return codec

    def _attach(self, cfg: CodecConfig, vae, device: str | torch.device, id: str) -> None:
        self.device = torch.device(device)
        self.sample = cfg.sample
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        config = self.vae.config
        self.id = id
        self.channels = config.latent_channels
        # Every down block but the last halves the resolution.
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scale = float(cfg.scale if cfg.scale is not None else config.scaling_factor)
        self.shift = float(cfg.shift if cfg.shift is not None else (config.get("shift_factor") or 0.0))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) as ``(z - shift) * scale``."""
        self._check_images(images)
        with torch.inference_mode():
            posterior = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
            z = posterior.sample() if self.sample else posterior.mean
            latents = (z - self.shift) * self.scale
        # A clone outside inference mode is an ordinary tensor, which a training graph may save for backward.
        return latents.clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h*f, w*f) in [-1, 1], inverting ``encode``'s normalisation."""
        with torch.inference_mode():
            z = latents.to(self.device, self.vae.dtype) / self.scale + self.shift
            images = self.vae.decode(z).sample.clamp(-1.0, 1.0)
        return images.clone()


_CODECS = ("pixels", "autoencoder_kl")


def build_codec(
    cfg: CodecConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ImageCodec:
    """Build the codec that ``cfg.kind`` names, frozen, on ``device`` in ``dtype``."""
    if cfg.kind == "pixels":
        return PixelCodec(device, dtype, cfg.pixel_downsample)
    if cfg.kind == "autoencoder_kl":
        return AutoencoderKLCodec(cfg, device, dtype)
    raise ValueError(f"unknown codec kind {cfg.kind!r}; valid kinds: {', '.join(_CODECS)}")


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 images (H, W, 3) each, or one (B, H, W, 3) array -> float32 (B, 3, H, W) in [-1, 1]."""
    array = images if isinstance(images, np.ndarray) else np.stack(list(images))
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (H, W, 3), got dtype {array.dtype} and batch shape {array.shape}"
        )
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded and clamped."""
    pixels = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()
