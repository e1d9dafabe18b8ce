"""Frozen text encoder: captions -> fixed-length token embeddings, mask and a pooled vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers takes seconds to import: load it only when an encoder is built
    from transformers import PreTrainedModel
    from transformers.utils import ModelOutput

from selfe.core.types import TextCond
from selfe.encoders.storage import MINILM, load_pretrained, model_id, resolve_model_dir

# Checkpoints whose AutoModel is more than a text encoder. The dedicated classes load only the text
# tower (T5's decoder alone is as large as its encoder; CLIP/SigLIP checkpoints carry a vision tower).
_TEXT_TOWER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModelWithProjection",
    "siglip": "SiglipTextModel",
}
# Models trained so that `pooler_output` is the sentence vector. BERT also has a pooler_output, but its
# CLS head was not trained for similarity: sentence-transformers mean-pools MiniLM instead.
_POOLER_OUTPUT_MODEL_TYPES = {"clip_text_model", "siglip_text_model"}


@dataclass
class TextEncoderConfig:
    """Which text encoder to use and how captions are cut and batched."""

    name: str = MINILM
    """Model location: a local dir, an ``s3://`` prefix, a hub id, or ``"minilm"`` (bundled, offline)."""
    max_tokens: int = 32
    """Token length L of every embedding, special tokens included; longer captions are truncated."""
    batch_size: int = 64
    """Captions per forward pass inside `TextEncoder.encode`."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"text encoder max_tokens ({self.max_tokens}) and batch_size ({self.batch_size}) must be >= 1"
            )


class TextEncoder:
    """A frozen transformers text encoder with fixed-length outputs.

    Attributes:
        width: per-token hidden width (384 for MiniLM).
        pooled_width: width of the pooled vector (384 for MiniLM).
        max_tokens: token length L of every embedding.
        id: stable ``<name>@<fingerprint>`` of the model files, for cache keys.
    """

    def __init__(
        self, cfg: TextEncoderConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from transformers import AutoTokenizer

        resolved = resolve_model_dir(cfg.name)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, resolved)
        self._attach(cfg, tokenizer, _load_text_model(resolved, dtype), device, model_id(cfg.name, resolved))

    @classmethod
    def from_loaded(cls, cfg: TextEncoderConfig, tokenizer, model, device: str | torch.device = "cpu",
                    id: str = "loaded") -> TextEncoder:
        """Around a tokenizer and model someone else loaded (a diffusers pipeline's components)."""
        encoder = cls.__new__(cls)
        encoder._attach(cfg, tokenizer, model, device, id)
        return encoder

    def _attach(self, cfg: TextEncoderConfig, tokenizer, model, device: str | torch.device, id: str) -> None:
        self.cfg = cfg
        self.max_tokens = cfg.max_tokens
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        # Right padding keeps absolute positions of real tokens fixed and lets `_encode_batch` pad outputs.
        self.tokenizer.padding_side = "right"
        self.model = model.to(self.device).eval().requires_grad_(False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and cfg.max_tokens > limit:
            raise ValueError(
                f"max_tokens={cfg.max_tokens} exceeds the {limit} positions of text encoder {cfg.name!r}; "
                f"lower max_tokens"
            )
        self.id = id
        probe = self.encode([""])
        self.width = probe.tokens.shape[-1]
        self.pooled_width = probe.pooled.shape[-1]

    def encode(self, prompts: Sequence[str]) -> TextCond:
        """Encode captions in batches of ``cfg.batch_size``; ``""`` is the null (unconditional) caption.

        Returns tensors on the encoder's device: tokens (B, L, width) zero at padding, mask (B, L),
        pooled (B, pooled_width).
        """
        if isinstance(prompts, str):
            raise TypeError("encode() takes a sequence of captions; wrap a single caption in a list")
        prompts = list(prompts)
        step = self.cfg.batch_size
        parts = [self._encode_batch(prompts[i : i + step]) for i in range(0, len(prompts), step)]
        if not parts:
            return self._empty()
        # Concatenating outside inference mode yields ordinary tensors: inference tensors cannot be saved
        # for backward, and callers feed these embeddings into a model that is being trained.
        return TextCond.concat(parts)

    def truncated(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) bool: True where a caption has more than ``max_tokens`` tokens and `encode` cuts it."""
        ids = self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"] if prompts else []
        return torch.tensor([len(x) > self.max_tokens for x in ids], dtype=torch.bool)

    def read_extent(self, prompt: str) -> tuple[int, int]:
        """(tokens in ``prompt``, characters of it that `encode` reads within ``max_tokens``)."""
        total = len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
        kept = self.tokenizer(prompt, truncation=True, max_length=self.max_tokens)
        try:
            spans = self.tokenizer(prompt, truncation=True, max_length=self.max_tokens,
                                   return_offsets_mapping=True)["offset_mapping"]
            chars = max((end for _, end in spans), default=0)
        except NotImplementedError:  # a slow (Python) tokenizer has no offsets: count the decoded text
            chars = len(self.tokenizer.decode(kept["input_ids"], skip_special_tokens=True))
        return total, chars

    def _encode_batch(self, prompts: list[str]) -> TextCond:
        # The model runs only up to the batch's longest caption and the outputs are zero-padded to
        # max_tokens afterwards: short captions then cost a fraction of a full-length pass, and with right
        # padding under the attention mask the real tokens' states do not depend on the padding.
        batch = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        mask = batch["attention_mask"].bool()
        with torch.inference_mode():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            states = out.last_hidden_state * mask.unsqueeze(-1)  # zero the padding positions
            pooled = self._pool(out, states, mask)
            tokens = states.new_zeros(len(prompts), self.max_tokens, states.shape[-1])
            tokens[:, : states.shape[1]] = states
            full_mask = mask.new_zeros(len(prompts), self.max_tokens)
            full_mask[:, : mask.shape[1]] = mask
        return TextCond(tokens, full_mask, pooled)

    def _pool(self, out: ModelOutput, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, width) -> (B, pooled_width): the model's own sentence vector, else masked mean + L2 norm."""
        if out.get("text_embeds") is not None:
            return out["text_embeds"]
        if self.model.config.model_type in _POOLER_OUTPUT_MODEL_TYPES:
            return out["pooler_output"]
        # As sentence-transformers' Pooling(mean) + Normalize; fp32 so bf16 sums do not lose precision.
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1).float()
        mean = tokens.float().sum(dim=1) / counts
        return F.normalize(mean, dim=-1).to(tokens.dtype)

    def _empty(self) -> TextCond:
        dtype = self.model.dtype
        return TextCond(
            torch.zeros(0, self.max_tokens, self.width, dtype=dtype, device=self.device),
            torch.zeros(0, self.max_tokens, dtype=torch.bool, device=self.device),
            torch.zeros(0, self.pooled_width, dtype=dtype, device=self.device),
        )


def _load_text_model(resolved: str, dtype: torch.dtype) -> PreTrainedModel:
    """Load only the text-encoding part of the checkpoint at ``resolved``."""
    import transformers
    from transformers import AutoConfig, AutoModel

    config = load_pretrained(AutoConfig.from_pretrained, resolved)
    tower = _TEXT_TOWER_CLASSES.get(config.model_type)
    if tower is not None:
        # Dual encoders keep the text settings in a sub-config, but the projection width on the parent.
        text_config = getattr(config, "text_config", config)
        if hasattr(config, "projection_dim"):
            text_config.projection_dim = config.projection_dim
        load = getattr(transformers, tower).from_pretrained
        return load_pretrained(load, resolved, config=text_config, dtype=dtype)
    model = load_pretrained(AutoModel.from_pretrained, resolved, config=config, dtype=dtype)
    return model.get_encoder() if config.is_encoder_decoder else model
