"""The ``[eval]`` section of a selfe config: which evaluation suite scores a model, on what, and how often,
and the suite names it accepts. Here, below the evaluation code that reads it (``selfe.eval``), like
every section (``selfe.config`` composes it into ``Config``). No Ray, no MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field

from selfe.configtools import ConfigError, check_range
from selfe.core.sampling import MAX_STEPS

SUITES = ("geneval_lite", "clip_fid")
"""The evaluation suites ``eval.suite`` names (besides ``"auto"``)."""


def resolve_suite(suite: str, source: str) -> str:
    """``"auto"`` -> ``"geneval_lite"`` for the shapes source, ``"clip_fid"`` for any other."""
    if suite == "auto":
        return "geneval_lite" if source == "shapes" else "clip_fid"
    if suite not in SUITES:
        raise ValueError(f"eval.suite must be auto, {' or '.join(SUITES)}, got {suite!r}")
    return suite


@dataclass
class EvalConfig:
    """Evaluation (GenEval-lite on the shapes world, CLIP score + FID on held-out real data) and sample
    grids. docs/evaluation.md has the suites, the held-out slice and which networks to point at."""

    suite: str = "auto"
    """"geneval_lite" (the shapes world's exact scorer), "clip_fid" (CLIP score and FID on a held-out slice
    of the training data) or "auto": geneval_lite for data.source="shapes", clip_fid otherwise. Picks the
    end-of-run table, pipelines/evaluate.py's default and the periodic metric Tune ranks trials by. [ours]"""
    clip_model: str = ""
    """clip_fid: the CLIP model for CLIP score (local folder, s3:// prefix or hub id such as
    openai/clip-vit-large-patch14), saved with its tokenizer and image processor."""
    fid_features: str = ""
    """clip_fid: the FID feature network: a folder (local or s3://) holding NVlabs' TorchScript
    inception-2015-12-05.pt (the literature's FID), or any transformers vision model (folder or hub id)."""
    heldout_fraction: float = 0.02
    """clip_fid: fraction of cache rows held out of training for evaluation, chosen by a hash of the caption
    (selfe/eval/heldout.py). Changing it changes the training set. [ours]"""
    num_images: int = 1000
    """clip_fid: held-out rows scored by the end-of-run evaluation and pipelines/evaluate.py (FID needs
    thousands for published-style numbers; it is biased upwards at small N)."""
    periodic_images: int = 128
    """clip_fid: held-out rows scored by the in-training evaluation (train.eval_every)."""

    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 50])
    """Sampling step counts to score."""
    prompt_set: str = "v1"
    max_prompts: int = 0
    """Score only the first N prompts per task (0 = all)."""
    seed: int = 1234
    batch_size: int = 128
    grid_prompts: int = 8
    """Prompts in each sample grid."""
    periodic_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Step counts averaged by the in-training evaluation (train.eval_every)."""
    periodic_per_task: int = 4
    """Prompts per task (and split) in the in-training evaluation."""
    untrained_reference: bool = True
    """Also score an untrained model (same seed) at 4 steps, as the floor to compare with."""

    def validate(self) -> None:
        for name in ("steps", "periodic_steps"):
            values = getattr(self, name)
            if not values or any(not 1 <= v <= MAX_STEPS for v in values):
                raise ConfigError(f"eval.{name} must be a non-empty list of step counts in [1, {MAX_STEPS}], "
                                  f"got {values}")
        check_range("eval", self, 0, "max_prompts", "seed")
        check_range("eval", self, 1, "batch_size", "grid_prompts", "periodic_per_task")
        check_range("eval", self, 2, "num_images", "periodic_images")
        if self.suite not in ("auto", *SUITES):
            raise ConfigError(f"eval.suite must be auto, {', '.join(SUITES)}, got {self.suite!r}")
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise ConfigError(f"eval.heldout_fraction must be in [0, 0.5], got {self.heldout_fraction}")

    def resolved_suite(self, source: str) -> str:
        """The suite for data.source=``source`` ("auto" resolved)."""
        return resolve_suite(self.suite, source)

    def check_for_source(self, source: str) -> None:
        """What only the data source decides: GenEval-lite needs the shapes world, CLIP/FID held-out rows."""
        suite = self.resolved_suite(source)
        if suite == "geneval_lite" and source != "shapes":
            raise ConfigError(f"eval.suite=geneval_lite scores the shapes world only, but data.source={source!r}: "
                              "use eval.suite=clip_fid (or auto) for real data")
        if suite == "clip_fid" and self.heldout_fraction <= 0:
            raise ConfigError("eval.suite=clip_fid scores held-out rows, but eval.heldout_fraction=0 holds none "
                              "out: set eval.heldout_fraction (e.g. 0.02)")

    def require_networks(self, source: str) -> None:
        """Before a job that evaluates with clip_fid starts: both networks must be named."""
        if self.resolved_suite(source) != "clip_fid":
            return
        missing = [f"eval.{name}" for name in ("clip_model", "fid_features") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"eval.suite resolves to clip_fid for data.source={source!r}, which needs "
                              f"{' and '.join(missing)}: set them to a local folder, s3:// prefix or hub id "
                              "(docs/evaluation.md), or set eval.suite=geneval_lite for the shapes world")
