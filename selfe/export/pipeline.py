"""A diffusers ``DiffusionPipeline`` that runs Self-E's any-step sampler, and the export that writes it.

Layout of an exported folder (``save_pretrained``)::

    model_index.json      component classes + ``selfe_config`` (the training config as TOML)
    transformer/          SelfETransformer2DModel: config.json + diffusion_pytorch_model.safetensors
    text_encoder/         the transformers text model (e.g. BertModel for MiniLM, T5EncoderModel)
    tokenizer/            its tokenizer
    vae/                  the diffusers AutoencoderKL, only for an ``autoencoder_kl`` codec
                          (a pixel codec has no weights: ``vae`` is null and the config says how to decode)

How the encoders travel: both are transformers/diffusers objects, so they are ordinary pipeline
components, saved and loaded by their own libraries; nothing points back at the training account.
The pipeline wraps them in selfe's ``TextEncoder`` / codec code paths and samples with
``ImageGenerator.generate``, so an export draws exactly the images ``pipelines/generate.py`` draws
for the same prompt, seed, steps, guidance, eta and landing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from selfe.config import Config, load_config
from selfe.encoders.image import AutoencoderKLCodec, ImageCodec, build_codec
from selfe.encoders.text import TextEncoder
from selfe.export.diffusers_model import SelfETransformer2DModel
from selfe.generator import ImageGenerator

OUTPUT_TYPES = ("pil", "np", "uint8")


class SelfEPipeline(DiffusionPipeline):
    """Text -> image with a Self-E MM-DiT at any number of steps (1 to 1000).

    ``pipe(prompt, num_inference_steps=2, seed=0).images`` -> PIL images; ``None`` settings take the
    model's training-time sampler config.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: SelfETransformer2DModel, text_encoder, tokenizer, vae=None,
                 selfe_config: str = "") -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        # Not a component: a plain value that model_index.json keeps and from_pretrained passes back.
        self.register_to_config(selfe_config=selfe_config)

    def selfe_config(self) -> Config:
        """The training config this pipeline samples with (sampler defaults, resolution, codec, time shift)."""
        if not self.config.selfe_config:
            raise ValueError("this pipeline has no selfe_config in model_index.json; export it with "
                             "pipelines/export.py")
        with tempfile.TemporaryDirectory() as tmp:  # load_config reads (and validates) a file
            path = Path(tmp) / "config.toml"
            path.write_text(self.config.selfe_config)
            return load_config(path)

    def image_generator(self) -> ImageGenerator:
        """selfe's generator over this pipeline's components, on the pipeline's device."""
        cfg, device = self.selfe_config(), self._execution_device
        text = _text_encoder_over(self.tokenizer, self.text_encoder, cfg, device)
        return ImageGenerator(self.transformer.net, cfg, text=text, codec=_codec_over(self.vae, cfg, device),
                              device=device)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, eta: float | None = None, landing: str | None = None,
                 seed: int = 0, output_type: str = "pil", return_dict: bool = True):
        """Images for ``prompt``: PIL images (``output_type="pil"``), float (N, H, W, 3) in [0, 1] ("np",
        diffusers' convention) or uint8 (N, H, W, 3) ("uint8"). Image i's noise depends only on (seed, i)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images, _ = self.image_generator().generate(prompts, steps=num_inference_steps, guidance=guidance_scale,
                                                     seed=seed, eta=eta, landing=landing)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(image) for image in images]
        elif output_type == "np":
            images = images.astype(np.float32) / 255.0
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _text_encoder_over(tokenizer, model, cfg: Config, device: torch.device) -> TextEncoder:
    """selfe's ``TextEncoder`` (padding, truncation, pooling) around the components diffusers loaded."""
    return TextEncoder.from_loaded(cfg.text, tokenizer, model, device, id=f"exported:{type(model).__name__}")


def _codec_over(vae, cfg: Config, device: torch.device) -> ImageCodec:
    """The pixel codec from the config, or an ``AutoencoderKLCodec`` around the loaded ``vae``."""
    if cfg.codec.kind == "pixels":
        return build_codec(cfg.codec, device=device)
    if vae is None:
        raise ValueError(f"codec kind {cfg.codec.kind!r} needs the pipeline's vae component, which is missing")
    return AutoencoderKLCodec.from_loaded(cfg.codec, vae, device, id="exported:vae")


def export_diffusers(generator: ImageGenerator, out: str | Path) -> Path:
    """Write ``generator`` (weights, text encoder, codec, sampler defaults) as a diffusers pipeline folder."""
    from dataclasses import replace

    from transformers import PreTrainedModel

    if not isinstance(generator.text.model, PreTrainedModel):
        raise ValueError(f"the text encoder ({type(generator.text.model).__name__}) is not a transformers "
                         "PreTrainedModel and cannot be saved as a pipeline component")
    cfg = replace(generator.cfg, text=replace(generator.cfg.text), codec=replace(generator.cfg.codec))
    # Where training loaded the encoders from means nothing here: they are the components below.
    cfg.text.name = "text_encoder"
    cfg.codec.path = "vae" if cfg.codec.kind != "pixels" else ""
    pipe = SelfEPipeline(
        transformer=SelfETransformer2DModel.from_mmdit(generator.model),
        text_encoder=generator.text.model, tokenizer=generator.text.tokenizer,
        vae=getattr(generator.codec, "vae", None), selfe_config=cfg.dump(),
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)
