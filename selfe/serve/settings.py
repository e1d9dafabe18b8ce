"""The settings of one serving deployment."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from selfe.configtools import ConfigError


@dataclass
class ServeSettings:
    """What ``pipelines/serve.py`` and ``build_app`` accept (``serve run ... key=value`` / a Serve config's
    ``args``). Queue bounds: a replica holds at most ``max_ongoing_requests`` requests (running or waiting
    for a batch); Serve keeps at most ``max_queued_requests`` more per caller and answers the rest 503 with
    ``Retry-After: retry_after_s``."""

    model: str = "models:/selfe@champion"
    """A folder, models:/name@alias (followed: a moved alias is loaded and swapped in), models:/name/N."""
    tracking_uri: str = ""
    """MLflow tracking URI ("": $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)."""
    device: str = "auto"
    max_batch_size: int = 16
    """Most images in one batched forward (requests are gathered until their images reach it; a batch
    can fill only if max_ongoing_requests x the requests' images reaches it)."""
    batch_wait_s: float = 0.02
    """How long the first request of a batch waits for others."""
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    retry_after_s: int = 1
    request_timeout_s: float = 60.0
    """A request not answered within this is answered 504 (its batch still finishes)."""
    max_images: int = 8
    """Most images one request may ask for."""
    max_prompt_chars: int = 1000
    text_cache_size: int = 1024
    """Prompt embeddings kept (least recently used dropped first)."""
    poll_s: float = 10.0
    """How often an alias is looked up in the registry (0: never; the first version stays)."""
    num_replicas: int = 1
    deployed_version: int = 0
    """Set when the app is built (``build_app``): the version the alias pointed at then. A replica that
    starts while the alias points at a version that does not load serves this one instead."""

    def validate(self) -> ServeSettings:
        positive = ("max_batch_size", "max_ongoing_requests", "max_queued_requests", "max_images",
                    "max_prompt_chars", "text_cache_size", "num_replicas", "request_timeout_s")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"serve setting {name} must be a positive number, got {value!r}")
        for name in ("batch_wait_s", "poll_s", "retry_after_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"serve setting {name} must be >= 0, got {value!r}")
        if self.max_images > self.max_batch_size:
            raise ConfigError(f"max_images ({self.max_images}) exceeds max_batch_size ({self.max_batch_size}): a "
                              "request for that many images would never fit a batch; lower max_images or raise "
                              "max_batch_size")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> ServeSettings:
        """Settings from ``serve run``'s key=value strings or a config file's ``args``: unknown keys are
        refused with the list of known ones; strings are converted to each field's type."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown serve setting(s) {unknown}; known: {', '.join(known)}")
        out = {}
        for key, value in values.items():
            kind = type(getattr(cls(), key))
            try:
                out[key] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"serve setting {key}={value!r}: expected {kind.__name__}") from None
        return cls(**out).validate()

    def as_dict(self) -> dict:
        return asdict(self)
