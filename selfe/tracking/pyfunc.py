"""The registered MLflow model, logged as a model from code: MLflow imports this file to load it.

``mlflow.pyfunc.load_model("models:/selfe@champion").predict(prompts, params=...)`` returns images
as a uint8 array (N, H, W, 3). Nothing is unpickled on load: the weights are safetensors in the
``model_dir`` artifact and the class is this file, so a model from the registry runs only code that
ships with this package.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


class SelfEPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict(prompts, params={"steps", "guidance", "seed", "eta", "landing"})``
    returns images as a uint8 array (N, H, W, 3)."""

    def load_context(self, context) -> None:
        from selfe.generator import load_generator

        device = "cuda" if _cuda() else "cpu"
        self.generator = load_generator(context.artifacts["model_dir"], device=device)

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        prompts = _prompts_from(model_input)
        p = dict(params or {})
        images, _ = self.generator.generate(
            prompts, steps=p.get("steps"), guidance=p.get("guidance"), seed=int(p.get("seed", 0)),
            eta=p.get("eta"), landing=p.get("landing"),
        )
        return images


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _prompts_from(model_input: Any) -> list[str]:
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
