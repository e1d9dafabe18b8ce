"""Prompts -> images with a trained model: text encoding, any-step sampling and decoding.

Used by the MLflow pyfunc model, ``pipelines/generate.py``, ``pipelines/evaluate.py`` and the
end-of-training evaluation. A saved model is a folder: ``weights.safetensors`` (EMA weights),
``config.toml`` (the resolved training config) and ``model_info.json``; a folder logged to MLflow may
also carry the encoders it needs under ``encoders/text`` and ``encoders/codec`` (named in
``model_info.json`` under ``"encoders"``, see ``selfe.tracking.registry``).

Where the encoders are loaded from, first match wins: an explicit argument (``text_encoder=`` /
``codec_path=``), the environment (``$SELFE_TEXT_ENCODER`` / ``$SELFE_CODEC_PATH``), the bundled copy,
then the location training used (``text.name`` / ``codec.path`` in ``config.toml``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selfe.config import Config, load_config
from selfe.encoders.image import ImageCodec, build_codec, tensor_to_images
from selfe.encoders.text import TextEncoder
from selfe.core.model import MMDiT, build_model
from selfe.core.types import TextCond
from selfe.core.sampling import SamplerConfig, randn_rows, resolve_sampler, sample

WEIGHTS, CONFIG, INFO = "weights.safetensors", "config.toml", "model_info.json"
TEXT_ENV, CODEC_ENV = "SELFE_TEXT_ENCODER", "SELFE_CODEC_PATH"
"""Environment variables that point a loaded model at its text encoder / VAE."""
DEVICES = "cpu, cuda, cuda:N or auto"


class EncoderUnavailable(OSError):
    """A model's text encoder or codec could not be loaded from where it was recorded."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> the first GPU if one is visible, else the CPU; ``cpu``/``cuda``/``cuda:N`` are checked
    against what this machine has, so a wrong choice fails before any weights are read."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use {DEVICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: no CUDA device is visible here; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return device


class ImageGenerator:
    """Holds the network, text encoder and codec; ``generate`` runs the any-step sampler."""

    def __init__(self, model: MMDiT, cfg: Config, text: TextEncoder | None = None, codec: ImageCodec | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.model = model.to(self.device).eval()
        self.text = text or TextEncoder(cfg.text, device=self.device)
        self.codec = codec or build_codec(cfg.codec, device=self.device)
        self.latent_size = cfg.data.resolution // self.codec.downsample
        self.shift_mu = cfg.shift_mu((self.latent_size, self.latent_size))
        self.null = self.text.encode([""])

    def encode_prompts(self, prompts: Sequence[str]) -> TextCond:
        """Embed prompts; one longer than the encoder's ``max_tokens`` is cut, with a warning."""
        for prompt, cut in zip(prompts, self.text.truncated(prompts).tolist()):
            if cut:
                tokens, chars = self.text.read_extent(prompt)
                warnings.warn(f"prompt truncated to the text encoder's {self.text.max_tokens} tokens "
                              f"(text.max_tokens): the model reads {chars} of its {len(prompt)} characters "
                              f"({self.text.max_tokens} of {tokens} tokens), up to ...{prompt[max(chars - 40, 0):chars]!r}",
                              stacklevel=2)
        return self.text.encode(list(prompts))

    def sampler(self, steps: int | None = None, guidance: float | None = None, eta: float | None = None,
                landing: str | None = None) -> SamplerConfig:
        """The model's sampler config with the given settings (None: the model's own) and every automatic
        one made concrete for its training method (``resolve_sampler``); validated."""
        sc = replace(self.cfg.sampler)
        for name, value in (("steps", steps), ("guidance", guidance), ("eta", eta), ("landing", landing)):
            if value is not None:
                setattr(sc, name, value)
        sc = resolve_sampler(sc, self.cfg.objective.method)
        sc.validate()
        return sc

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        eta: float | None = None,
        landing: str | None = None,
        batch_size: int = 64,
    ) -> tuple[np.ndarray, int]:
        """Images (N, H, W, 3) uint8 for ``prompts`` and the NFE per image. Image i's noise depends
        only on (seed, i) (``noise_seeds``), so results do not change with batch size."""
        sc = self.sampler(steps, guidance, eta, landing)
        keys = noise_seeds(seed, len(prompts))
        out, nfe = [], 0
        for start in range(0, len(prompts), batch_size):
            images, nfe = self.sample_rows(self.encode_prompts(prompts[start:start + batch_size]),
                                           keys[start:start + batch_size], sc)
            out.append(images)
        return np.concatenate(out), nfe

    @torch.no_grad()
    def sample_rows(self, cond: TextCond, keys: Sequence[int], sc: SamplerConfig) -> tuple[np.ndarray, int]:
        """One batched sampling run: row i conditioned on ``cond[i]`` draws all its noise from a generator
        seeded with ``keys[i]``, so a row's image does not depend on the rows beside it. ``sc``: a
        resolved config (``sampler``). Returns uint8 images (B, H, W, 3) and the NFE per image."""
        c = self.codec.channels
        gens = [torch.Generator().manual_seed(k) for k in keys]
        noise = randn_rows(torch.empty(len(keys), c, self.latent_size, self.latent_size), gens).to(self.device)
        latents, nfe = sample(self.model, noise, cond.to(self.device), self.null, sc, self.shift_mu, generator=gens)
        return tensor_to_images(self.codec.decode(latents)), nfe


def noise_seeds(seed: int, count: int) -> list[int]:
    """The noise seed of each of ``count`` images asked for with ``seed``: image i draws from
    ``seed * 1_000_003 + i`` (``generate``, the registered model and the server agree on it)."""
    return [seed * 1_000_003 + i for i in range(count)]


def save_model_dir(path: str | Path, model: MMDiT, cfg: Config, extra: dict | None = None) -> Path:
    """Write weights + config + info so ``load_generator`` can rebuild the model anywhere."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    (path / CONFIG).write_text(cfg.dump())
    info = {"text_encoder": cfg.text.name, "codec": cfg.codec.kind, "codec_path": cfg.codec.path,
            "resolution": cfg.data.resolution, "preset": cfg.preset, **(extra or {})}
    (path / INFO).write_text(json.dumps(info, indent=2))
    return path


def encoder_locations(path: str | Path, cfg: Config, text_encoder: str | None = None,
                      codec_path: str | None = None) -> tuple[str, str]:
    """Where this model folder's text encoder and VAE are loaded from (see the module docstring);
    the codec path is "" for the pixel codec."""
    path = Path(path)
    info = json.loads((path / INFO).read_text()) if (path / INFO).is_file() else {}
    bundled = info.get("encoders", {})

    def pick(explicit: str | None, env: str, key: str, trained: str) -> str:
        if explicit or os.environ.get(env):
            return explicit or os.environ[env]
        folder = bundled.get(key, {}).get("bundled")
        return str(path / folder) if folder else trained

    text = pick(text_encoder, TEXT_ENV, "text", cfg.text.name)
    codec = pick(codec_path, CODEC_ENV, "codec", cfg.codec.path) if cfg.codec.kind != "pixels" else ""
    return text, codec


def load_generator(path: str | Path, device: str | torch.device = "cpu", text_encoder: str | None = None,
                   codec_path: str | None = None) -> ImageGenerator:
    """Rebuild the generator saved at ``path`` on ``device`` (a name ``resolve_device`` accepts, or a
    torch.device). ``text_encoder`` / ``codec_path`` override where the encoders are loaded from.

    Raises:
        FileNotFoundError: ``path`` is not a folder written by ``save_model_dir``.
        ValueError: its weights file is not safetensors, or holds another model's tensors.
        EncoderUnavailable: an encoder could not be loaded; the message says how to point at a copy.
    """
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS}; expected a folder written by save_model_dir")
    device = resolve_device(device) if isinstance(device, str) else device
    cfg = load_config(path / CONFIG)
    cfg.text.name, cfg.codec.path = encoder_locations(path, cfg, text_encoder, codec_path)
    model = build_model(cfg.model, "cpu")
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except (SafetensorError, RuntimeError) as e:  # not safetensors at all / tensors of another model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path / WEIGHTS} is not this model's weights ({first}); the folder is damaged or "
                         f"mixed up: export it again (the training job's model folder, or pipelines/export.py)") from None
    try:  # the codec first: an unreachable VAE is reported without loading the text encoder
        codec = build_codec(cfg.codec, device=device)
    except (OSError, RuntimeError, ImportError) as e:
        raise _unavailable("VAE (codec.path)", cfg.codec.path, CODEC_ENV, "codec_path", e) from e
    try:
        text = TextEncoder(cfg.text, device=device)
    except (OSError, RuntimeError, ImportError) as e:
        raise _unavailable("text encoder", cfg.text.name, TEXT_ENV, "text_encoder", e) from e
    return ImageGenerator(model, cfg, text=text, codec=codec, device=device)


def _unavailable(what: str, location: str, env: str, key: str, error: Exception) -> EncoderUnavailable:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return EncoderUnavailable(
        f"cannot load the model's {what} from {location!r} ({first}); the model does not bundle it: set "
        f"{env}=<local dir, s3:// prefix or hub id> (MLflow pyfunc: model_config={{'{key}': ...}})")
