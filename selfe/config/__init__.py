"""The resolved configuration of a selfe job: typed sections, presets, TOML files and dotted overrides.

Order of precedence: preset < TOML file < ``--section.field=value`` overrides. ``load_config``
validates everything before any work starts, so a typo fails in milliseconds, not after an hour.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfe.configtools import (
    ConfigError, apply_dict, apply_override, parse_overrides, to_toml,
)
from selfe.core.ema import EMAConfig
from selfe.encoders.image import CodecConfig
from selfe.encoders.text import TextEncoderConfig
from selfe.core.model import MODEL_PRESETS, ModelConfig
from selfe.core.objective import ObjectiveConfig, time_shift_mu
from selfe.core.sampling import SamplerConfig
from selfe.config.evaluation import EvalConfig
from selfe.config.sections import DataConfig, OptimConfig, TrackingConfig, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Config:
    """Everything one selfe job needs."""

    preset: str = "tiny"
    """Model size preset: tiny, 0.5b or 2b. Applied first; the TOML and overrides refine it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    anneal_fraction: float = 0.42
    """tau annealing horizon as a fraction of train.steps (paper: 300k of 710k); sets
    objective.anneal_steps unless that is given explicitly. [ours]"""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                try:
                    section.validate()
                except ConfigError:
                    raise
                except ValueError as e:
                    raise ConfigError(str(e)) from e
        if not 0.0 <= self.anneal_fraction <= 1.0:
            raise ConfigError(f"anneal_fraction must be in [0, 1], got {self.anneal_fraction}")
        self.eval.check_for_source(self.data.source)
        if self.codec.pixel_downsample < 1:
            raise ConfigError(f"codec.pixel_downsample must be >= 1, got {self.codec.pixel_downsample}")
        f = self.codec.pixel_downsample if self.codec.kind == "pixels" else 1
        if self.codec.kind == "pixels" and self.data.resolution % (f * self.model.patch_size):
            raise ConfigError(
                f"data.resolution={self.data.resolution} must be divisible by codec.pixel_downsample={f} x "
                f"model.patch_size={self.model.patch_size}"
            )

    def shift_mu(self, latent_hw: tuple[int, int]) -> float:
        """The time shift mu that training and sampling share at this latent size (h, w)."""
        return time_shift_mu(self.model.num_tokens(*latent_hw), self.objective.shift_base_len)

    def dump(self) -> str:
        """The resolved config as TOML (loadable with ``load_config(config_path=...)``)."""
        return to_toml(self)


# Per-preset training defaults beyond the model shape.
# The paper's sizes assume the FLUX VAE (16 channels) and T5-XXL tokens; with a single text encoder the
# pooled vector is T5's mean-pooled state (4096 wide).
PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    # CPU: 32x32 images; the model works on 16x16 average-pooled pixels with 2x2 patches (64 tokens)
    # and decoding upsamples bilinearly (the round trip keeps GenEval-lite's ground truth at 1.000).
    # 9000 compiled steps fill a ~20-minute default job on 2 cores (cache and evaluation included) and
    # draw shapes from 2 steps on; 20 prompts per task and split make the table's SE ~0.035
    # (docs/recipe.md, "A default run that draws").
    # The recipe is docs/recipe.md's: half-resolution pixels (flow matching 0.625 vs 0.350 at 50 steps
    # after 40 minutes), absolute positions (coherent objects instead of scattered tiles), batch 16
    # (twice the updates per image), guidance 2 (5 scored lower at 2 and 50 steps).
    "tiny": {
        "model": {**MODEL_PRESETS["tiny"], "patch_size": 2, "abs_pos_embed": True},
        "codec": {"pixel_downsample": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 100, "lr_end": 1e-4},
        # 2k images ~ 0.995 per step at batch 16: what the per-step decay's warm-up gave the old default.
        "ema": {"half_life_kimg": 2.0},
        # Shapes captions are <= 16 MiniLM tokens; 16 instead of 32 saves ~15% of the step.
        "text": {"max_tokens": 16},
        "sampler": {"guidance": 2.0},
        "train": {"steps": 9000, "batch_size": 16, "checkpoint_every": 1500, "compile": True},
        "eval": {"max_prompts": 20},
    },
    "0.5b": {
        "model": {**MODEL_PRESETS["0.5b"], "in_channels": 16, "text_width": 4096, "pooled_width": 4096},
        "codec": {"kind": "autoencoder_kl"},
        # T5-XXL token rows are ~4 MB each: a 512-row shuffle buffer holds ~2 GB per worker.
        # Hashing a multi-TB cache at every job start would download it: sizes only.
        "data": {"shuffle_buffer_rows": 512, "verify_cache": "size"},
        # compile: 0.587 -> 0.334 s per Self-E step under FSDP2 on an H200 (docs/benchmarks.md).
        "train": {"use_gpu": True, "batch_size": 256, "steps": 300_000, "compile": True},
    },
    "2b": {
        "model": {**MODEL_PRESETS["2b"], "in_channels": 16, "text_width": 4096, "pooled_width": 4096},
        "codec": {"kind": "autoencoder_kl"},
        "data": {"shuffle_buffer_rows": 512, "verify_cache": "size"},
        "train": {"use_gpu": True, "batch_size": 512, "steps": 710_000, "activation_checkpointing": True,
                  "compile": True},
    },
}


RETIRED_KEYS = (("sampler", "shift_base_len"), ("model", "conv_head"))
"""Keys older versions wrote into saved configs: ignored in files, rejected as overrides. The time
shift has one field now (``objective.shift_base_len``); the measured-and-dropped convolutional output
head (docs/recipe.md) was never on in a preset."""


def load_config(
    config_path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None
) -> Config:
    """Build and validate a Config. ``overrides`` are command-line style: ``["--optim.lr=1e-4"]``."""
    file_data: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing .toml with --config")
        with path.open("rb") as fh:
            try:
                file_data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    for section, key in RETIRED_KEYS:  # files saved by older versions (model folders, registered models)
        file_data.get(section, {}).pop(key, None)
    pairs = parse_overrides(overrides or [])
    chosen = preset or dict(pairs).get("preset") or file_data.get("preset") or "tiny"
    if chosen not in PRESET_OVERRIDES:
        raise ConfigError(f"unknown preset {chosen!r}; choose one of {', '.join(PRESET_OVERRIDES)}")
    cfg = Config(preset=chosen)
    apply_dict(cfg, PRESET_OVERRIDES[chosen])
    apply_dict(cfg, {k: v for k, v in file_data.items() if k != "preset"})
    explicit_anneal = "anneal_steps" in file_data.get("objective", {})
    for key, value in pairs:
        if key == "preset":
            continue
        apply_override(cfg, key, value)
        explicit_anneal |= key == "objective.anneal_steps"
    cfg.train.validate()  # before anything is derived from it
    if not explicit_anneal:
        cfg.objective.anneal_steps = round(cfg.anneal_fraction * cfg.train.steps)
    cfg.validate()
    return cfg
