"""The registered MLflow model, logged as a model from code: MLflow imports this file to load it.

``mlflow.pyfunc.load_model("models:/selfe@champion").predict(prompts, params=...)`` returns images
as a uint8 array (N, H, W, 3). Nothing is unpickled on load: the weights are safetensors in the
``model_dir`` artifact and the class is this file, so a model from the registry runs only code that
ships with this package.

``load_model(uri, model_config={...})`` accepts ``device`` (cpu, cuda, cuda:N, auto; default auto),
``text_encoder`` and ``codec_path`` (where to load encoders the model does not bundle from).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


class SelfEPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict(prompts, params={"steps", "guidance", "seed", "eta", "landing"})``
    returns images as a uint8 array (N, H, W, 3). The logged signature declares the params with the
    model's own sampler defaults (``selfe.tracking.registry.model_signature``)."""

    def load_context(self, context) -> None:
        from selfe.generator import load_generator

        config = dict(context.model_config or {})
        self.generator = load_generator(context.artifacts["model_dir"], device=config.get("device") or "auto",
                                        text_encoder=config.get("text_encoder"), codec_path=config.get("codec_path"))

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> np.ndarray:
        """Prompts (N,) -> images (N, H, W, 3) uint8; image i's noise depends only on (seed, i)."""
        p = dict(params or {})
        images, _ = self.generator.generate(
            _prompts_from(model_input), steps=_opt(p, "steps", int), guidance=_opt(p, "guidance", float),
            seed=int(p.get("seed") or 0), eta=_opt(p, "eta", float), landing=p.get("landing"),
        )
        return images


def _opt(params: dict[str, Any], key: str, kind: type) -> Any:
    value = params.get(key)
    return None if value is None else kind(value)


def _prompts_from(model_input: Any) -> list[str]:
    # The type hint is list[str], but a served model may still receive a DataFrame or a dict.
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[col].tolist()]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", model_input.get("prompts"))
        return [value] if isinstance(value, str) else list(value)
    return [str(x) for x in model_input]


mlflow.models.set_model(SelfEPyfunc())
