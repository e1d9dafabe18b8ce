"""The networks that turn images into features for FID and CLIP score, loaded like the other
encoders: from a local path, an ``s3://`` prefix (mirrored once, ``selfe.encoders.storage``) or a
Hugging Face hub id.

Two kinds of FID feature network (``eval.fid_features``), told apart by what the folder holds:

* **TorchScript** (a folder, or a local file, with one ``*.pt``): the calling convention of NVlabs'
  ``inception-2015-12-05.pt`` (the TF-Inception port used by StyleGAN2-ADA/3 and clean-fid, the FID
  of the literature): ``net(images, return_features=True)`` with uint8 images (N, 3, H, W) in
  [0, 255] of any size (the network resizes to 299 itself) -> pool3 features (N, 2048).
* **transformers** (a folder with ``config.json`` + ``preprocessor_config.json``, or a hub id): any
  vision model ``AutoModel`` loads, e.g. ``facebook/dinov2-base`` (FD-DINOv2) or a CLIP. Features:
  ``get_image_features`` when the model has it (CLIP, SigLIP), else ``pooler_output``, else the
  token mean of ``last_hidden_state`` -> (N, D). A Fréchet distance in such a feature space is only
  comparable with itself, not with published FIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfe.encoders.storage import is_hub_id, load_pretrained, resolve_model_dir

_HOW_TO = ("pass a folder (local or s3://) holding one TorchScript *.pt (e.g. NVlabs' inception-2015-12-05.pt) "
           "or a transformers vision model saved with save_pretrained (config.json + preprocessor_config.json), "
           "or a hub id")


class TorchScriptFeatures:
    """A TorchScript feature net with NVlabs' convention: uint8 (N, 3, H, W) -> features (N, D)."""

    def __init__(self, path: Path, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = torch.jit.load(str(path), map_location=self.device).eval()
        self.name = path.name

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 features (N, D)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        return self.net(x, return_features=True).double().cpu().numpy()


class TransformersFeatures:
    """A transformers vision model and its image processor: uint8 images -> features (N, D)."""

    def __init__(self, model: Any, processor: Any, name: str, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.name = name

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 features (N, D)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return image_features(self.model, pixels).double().cpu().numpy()


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) processed pixels -> (N, D): ``get_image_features`` (projected CLIP/SigLIP
    embeddings), else ``pooler_output``, else the mean of ``last_hidden_state`` over tokens."""
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixel_values)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    out = model(pixel_values=pixel_values)
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    return out.last_hidden_state.mean(dim=1)


def _torchscript_file(path: Path) -> Path | None:
    """The one ``*.pt`` under ``path`` (a file or a folder), or None when it holds a transformers model."""
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return None
    scripts = sorted(path.glob("*.pt"))
    if len(scripts) != 1:
        raise FileNotFoundError(f"{path} holds {len(scripts)} *.pt files and no config.json; {_HOW_TO}")
    return scripts[0]


def load_feature_net(location: str, device: str | torch.device = "cpu") -> TorchScriptFeatures | TransformersFeatures:
    """The FID feature network at ``location`` (local file/folder, ``s3://`` prefix or hub id)."""
    if not location:
        raise ValueError(f"eval.fid_features is empty: {_HOW_TO}")
    local_file = Path(location).expanduser()
    resolved = str(local_file) if local_file.is_file() else resolve_model_dir(location)
    if not is_hub_id(resolved):
        script = _torchscript_file(Path(resolved))
        if script is not None:
            return TorchScriptFeatures(script, device)
    from transformers import AutoImageProcessor, AutoModel

    model = load_pretrained(AutoModel.from_pretrained, resolved)
    processor = load_pretrained(AutoImageProcessor.from_pretrained, resolved)
    return TransformersFeatures(model, processor, Path(resolved).name, device)


def batched_features(net: TorchScriptFeatures | TransformersFeatures, images: np.ndarray,
                     batch_size: int = 64) -> np.ndarray:
    """Features of uint8 images (N, H, W, 3) in batches -> (N, D) float64."""
    chunks = [net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks, axis=0)
