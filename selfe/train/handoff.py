"""What the driver hands each Ray Train worker, as one typed object (``WorkerInputs``), and what
comes back in every report besides the metrics (``PLACEMENT_GROUP_KEY``).

It crosses into the workers inside ``train_loop_config={"inputs": WorkerInputs(...)}``, pickled as
it is: the `Config` object itself, not a dict round trip of it. ``worker_inputs`` is the one place it
is built (the training job, the sweep trials and the benchmarks all call it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from selfe.config import Config
from selfe.core.types import TextCond

PLACEMENT_GROUP_KEY = "placement_group_id"
"""Every ``ray.train.report`` carries the hex id of the placement group the workers run in, so that a
sweep can give back the group of a trial Tune stopped (``selfe.sweep.resources``)."""

StepHook = Callable[[int, int, int, dict], None]
"""Called after every optimiser step with (step, rank, world size, the step's statistics): test-only
fault injection and loss records (``tests/faults.py``); production runs pass none."""


@dataclass
class EncodedPrompts:
    """Prompts the workers sample during training (grids, periodic evaluation), encoded once on the
    driver: ``records`` are prompt-set rows ({"prompt", "spec", ...}); ``cond`` their embeddings (N, ...)."""

    records: list[dict]
    cond: TextCond

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]


@dataclass
class TrackingTarget:
    """Where rank 0 logs: the MLflow run, the tracking URI (workers do not inherit the driver's
    mlflow state) and the local folder that spools metrics while the server is unreachable."""

    run_id: str
    tracking_uri: str
    spool_dir: str


@dataclass
class WorkerInputs:
    """Everything ``train_loop_per_worker`` receives besides the dataset shard."""

    cfg: Config
    null: TextCond
    """The embedding of "" (1, L, D) stored with the cache: the unconditional branch."""
    latent_shape: tuple[int, int, int]
    """(C, h, w) of the cache's latents (``selfe.data.contract.latent_shape``)."""
    grid: EncodedPrompts | None = None
    periodic_eval: EncodedPrompts | None = None
    tracking: TrackingTarget | None = None
    step_hooks: list[StepHook] = field(default_factory=list)
    periodic_latents: np.ndarray | None = None
    """eval suite clip_fid: the held-out rows' cache latents (N, C, h, w), decoded into FID's reference
    images on rank 0 at the first periodic evaluation; ``periodic_eval`` holds their captions."""

    @property
    def image_tokens(self) -> int:
        """Tokens per image: the one count the objective's time shift, tokens/s and MFU all use."""
        return self.cfg.model.num_tokens(*self.latent_shape[1:])


def encode_prompts(text, records: list[dict]) -> EncodedPrompts:
    return EncodedPrompts(records, text.encode([r["prompt"] for r in records]))


def worker_inputs(cfg: Config, text, null: TextCond, latent_shape: tuple[int, int, int],
                  tracking: TrackingTarget | None = None, step_hooks: list[StepHook] | None = None,
                  cache_path: str = "") -> WorkerInputs:
    """Build the hand-off: grid and periodic-evaluation prompts (when their schedules are on) are
    selected from ``cfg.eval.prompt_set`` and encoded with ``text`` (a ``TextEncoder``); with the
    clip_fid suite they are held-out rows of the cache at ``cache_path`` (their stored embeddings)."""
    from selfe.eval.runner import select_prompts

    if cfg.eval.resolved_suite(cfg.data.source) == "clip_fid" and (cfg.train.sample_every or cfg.train.eval_every):
        return _heldout_inputs(cfg, null, latent_shape, tracking, step_hooks, cache_path)
    grid = periodic = None
    if cfg.train.sample_every:
        grid = encode_prompts(text, select_prompts(cfg.eval.prompt_set, max_per_task=2)[: cfg.eval.grid_prompts])
    if cfg.train.eval_every:
        periodic = encode_prompts(text, select_prompts(cfg.eval.prompt_set, max_per_task=cfg.eval.periodic_per_task))
    return WorkerInputs(cfg, null, tuple(latent_shape), grid, periodic, tracking, list(step_hooks or []))


def _heldout_inputs(cfg: Config, null: TextCond, latent_shape: tuple[int, int, int], tracking: TrackingTarget | None,
                    step_hooks: list[StepHook] | None, cache_path: str) -> WorkerInputs:
    """Grid and periodic evaluation on held-out cache rows (the clip_fid suite)."""
    from selfe.eval.heldout import read_heldout

    if not cache_path:
        raise ValueError("the clip_fid suite samples held-out cache rows during training: pass cache_path")
    if cfg.train.eval_every:
        cfg.eval.require_networks(cfg.data.source)
    limit = max(cfg.eval.periodic_images if cfg.train.eval_every else 0, cfg.eval.grid_prompts)
    rows = read_heldout(cache_path, cfg.eval.heldout_fraction, limit, cfg.data.s3_endpoint)
    as_prompts = lambda part: EncodedPrompts([{"prompt": c} for c in part.captions], part.cond)  # noqa: E731
    grid = as_prompts(rows.head(cfg.eval.grid_prompts)) if cfg.train.sample_every else None
    periodic = latents = None
    if cfg.train.eval_every:
        part = rows.head(cfg.eval.periodic_images)
        periodic, latents = as_prompts(part), part.latents
    return WorkerInputs(cfg, null, tuple(latent_shape), grid, periodic, tracking, list(step_hooks or []), latents)
