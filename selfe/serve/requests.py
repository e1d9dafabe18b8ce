"""The body of ``POST /v1/images``. Validation errors become 422 answers that name the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SERVE_STEPS = 100
MAX_GUIDANCE = 50.0


def image_request_model(max_images: int, max_prompt_chars: int) -> type[BaseModel]:
    """The request model with this deployment's limits (they show in the OpenAPI page at /docs)."""

    class ImageRequest(BaseModel):
        """One prompt, ``num_images`` images of it. Fields left out take the model's defaults
        (``GET /v1/model``)."""

        model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

        prompt: str = Field(min_length=1, max_length=max_prompt_chars, description="the text to draw")
        steps: int | None = Field(None, ge=1, le=MAX_SERVE_STEPS,
                                  description="sampling steps (default: the model's few-step setting)")
        guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                       description="classifier-free guidance scale (default: the model's)")
        seed: int = Field(0, ge=0, le=2**31 - 1, description="image i draws its noise from seed * 1000003 + i")
        num_images: int = Field(1, ge=1, le=max_images)
        format: Literal["png", "json"] = Field(
            "png", description="png: the image bytes (several images as one row); json: base64 PNGs and details")

        @field_validator("prompt")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("prompt is blank; give the text to draw")
            return value

    return ImageRequest
