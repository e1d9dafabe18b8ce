"""Prompts -> images with a trained model: text encoding, any-step sampling and decoding.

Used by the MLflow pyfunc model, ``pipelines/generate.py``, ``pipelines/evaluate.py`` and the
end-of-training evaluation. A saved model is a folder: ``weights.safetensors`` (EMA weights),
``config.toml`` (the resolved training config) and ``model_info.json``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from selfe.config import Config, load_config
from selfe.encoders.image import ImageCodec, build_codec, tensor_to_images
from selfe.encoders.text import TextEncoder
from selfe.core.model import MMDiT, build_model
from selfe.core.types import TextCond
from selfe.core.sampling import randn_rows, resolve_landing, sample

WEIGHTS, CONFIG, INFO = "weights.safetensors", "config.toml", "model_info.json"


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
                warnings.warn(f"prompt truncated to the text encoder's {self.text.max_tokens} tokens "
                              f"(text.max_tokens): {prompt[:60]!r}...", stacklevel=2)
        return self.text.encode(list(prompts))

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
        only on (seed, i), so results do not change with batch size."""
        sc = replace(self.cfg.sampler)
        for name, value in (("steps", steps), ("guidance", guidance), ("eta", eta), ("landing", landing)):
            if value is not None:
                setattr(sc, name, value)
        sc.landing = resolve_landing(sc.landing, self.cfg.objective.method)
        sc.validate()
        c = self.codec.channels
        out, nfe = [], 0
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            cond = self.encode_prompts(chunk)
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
            noise = randn_rows(torch.empty(len(chunk), c, self.latent_size, self.latent_size), gens).to(self.device)
            latents, nfe = sample(self.model, noise, cond, self.null, sc, self.shift_mu, generator=gens)
            out.append(tensor_to_images(self.codec.decode(latents)))
        return np.concatenate(out), nfe


def save_model_dir(path: str | Path, model: MMDiT, cfg: Config, extra: dict | None = None) -> Path:
    """Write weights + config + info so ``load_generator`` can rebuild the model anywhere."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    (path / CONFIG).write_text(cfg.dump())
    info = {"text_encoder": cfg.text.name, "codec": cfg.codec.kind, "resolution": cfg.data.resolution,
            "preset": cfg.preset, **(extra or {})}
    (path / INFO).write_text(json.dumps(info, indent=2))
    return path


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> ImageGenerator:
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS}; expected a folder written by save_model_dir")
    cfg = load_config(path / CONFIG)
    model = build_model(cfg.model, "cpu")
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return ImageGenerator(model, cfg, device=device)
