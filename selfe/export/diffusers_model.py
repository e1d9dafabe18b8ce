"""The MM-DiT as a diffusers model: ``save_pretrained`` writes ``config.json`` (the ``ModelConfig``
fields) and ``diffusion_pytorch_model.safetensors``; ``from_pretrained`` rebuilds it."""

from __future__ import annotations

from dataclasses import asdict, fields

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from selfe.core.model import MMDiT, ModelConfig


class SelfETransformer2DModel(ModelMixin, ConfigMixin):
    """``MMDiT`` behind diffusers' config and weight I/O. The arguments are ``ModelConfig``'s fields,
    with its defaults (``register_to_config`` needs them spelled out to record them)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        width: int = ModelConfig.width,
        head_dim: int = ModelConfig.head_dim,
        double_blocks: int = ModelConfig.double_blocks,
        single_blocks: int = ModelConfig.single_blocks,
        mlp_ratio: float = ModelConfig.mlp_ratio,
        patch_size: int = ModelConfig.patch_size,
        in_channels: int = ModelConfig.in_channels,
        text_width: int = ModelConfig.text_width,
        pooled_width: int = ModelConfig.pooled_width,
        rope_theta: float = ModelConfig.rope_theta,
        time_freq_dim: int = ModelConfig.time_freq_dim,
        abs_pos_embed: bool = ModelConfig.abs_pos_embed,
        prediction: str = ModelConfig.prediction,
        clean_t_min: float = ModelConfig.clean_t_min,
    ) -> None:
        super().__init__()
        names = [f.name for f in fields(ModelConfig)]
        self.net = MMDiT(ModelConfig(**{name: getattr(self.config, name) for name in names}))

    @classmethod
    def from_mmdit(cls, model: MMDiT) -> SelfETransformer2DModel:
        """A wrapper holding a copy of ``model``'s weights (float32, as ``save_model_dir`` stores them)."""
        wrapper = cls(**asdict(model.cfg))
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        wrapper.net.load_state_dict(state)
        return wrapper.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,), s (B,), txt (B, L, text_width), txt_mask (B, L), pooled (B, pooled_width)
        -> V (B, C, H, W): ``MMDiT.forward``."""
        return self.net(x, t, s, txt, txt_mask, pooled)
