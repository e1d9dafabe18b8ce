"""CLIP score: how well images match their captions, as judged by a CLIP model.

For image embeddings E_img (N, P) and caption embeddings E_txt (N, P) of the same N pairs (CLIP's
projected features),

    CLIPScore = 100 * mean_i max(cos(E_img[i], E_txt[i]), 0)

(Hessel et al. 2021 with w = 100, as torchmetrics computes it). Higher is better; ViT-L/14 gives
roughly 25-35 for good text-to-image models. The model (``eval.clip_model``) is any ``CLIPModel``
folder saved with ``save_pretrained`` together with its tokenizer and image processor (local,
``s3://`` or a hub id such as ``openai/clip-vit-large-patch14``); captions longer than the text
tower's positions (77 for OpenAI CLIP) are truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from selfe.encoders.storage import load_pretrained, resolve_model_dir
from selfe.eval.feature_nets import image_features


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair scores 100 * max(cos, 0): image_embeds (N, P), text_embeds (N, P) -> (N,)."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"need one caption per image: image embeddings {tuple(image_embeds.shape)}, "
                         f"text embeddings {tuple(text_embeds.shape)}")
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100.0 * cos.clamp(min=0.0)


class ClipScorer:
    """A CLIP model with its tokenizer and image processor: (images, captions) -> CLIP score."""

    def __init__(self, location: str, device: str | torch.device = "cpu") -> None:
        if not location:
            raise ValueError("eval.clip_model is empty: pass a CLIP folder (local or s3://, saved with "
                             "save_pretrained with its tokenizer and image processor) or a hub id")
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        resolved = resolve_model_dir(location)
        self.device = torch.device(device)
        self.model = load_pretrained(CLIPModel.from_pretrained, resolved).to(self.device).eval()
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, resolved)
        self.processor = load_pretrained(AutoImageProcessor.from_pretrained, resolved)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.name = Path(resolved).name

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> projected text embeddings (N, P)."""
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> projected image embeddings (N, P)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return image_features(self.model, pixels)

    def per_image(self, images: np.ndarray, captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Per-pair scores (N,) of uint8 images (N, H, W, 3) against their captions (N)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: need one caption per image")
        scores = [clip_score_from_embeddings(self.image_embeddings(images[i:i + batch_size]),
                                             self.text_embeddings(captions[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
        return torch.cat(scores).cpu().numpy()

    def score(self, images: np.ndarray, captions: Sequence[str], batch_size: int = 64) -> float:
        """CLIPScore = 100 * mean max(cos, 0) over the pairs."""
        return float(self.per_image(images, captions, batch_size).mean())
