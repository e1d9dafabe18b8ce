"""Resolve a model reference to a local model folder: ``models:/name@alias``, ``models:/name/3``,
``runs:/<id>/model`` or a local folder written by ``save_model_dir``."""

from __future__ import annotations

from pathlib import Path

from selfe.generator import WEIGHTS, ImageGenerator, load_generator


def model_dir_for(ref: str) -> Path:
    local = Path(ref)
    if local.is_dir():
        return local
    if not ref.startswith(("models:/", "runs:/")):
        raise ValueError(f"model {ref!r} is neither a folder nor an MLflow URI (models:/name@alias, runs:/id/model)")
    from selfe.tracking import download_model_artifacts

    root = download_model_artifacts(ref)
    found = [p.parent for p in root.rglob(WEIGHTS)]
    if not found:
        raise FileNotFoundError(f"{ref} holds no {WEIGHTS}; was it logged by selfe?")
    return found[0]


def load_model_ref(ref: str, device: str = "cpu") -> ImageGenerator:
    """An ImageGenerator for a registry reference or local folder."""
    return load_generator(model_dir_for(ref), device=device)
