"""One Tune trial: a small driver that builds and fits one TorchTrainer.

Ray Train V2 cannot be handed to a Tuner as a Trainer. Instead the Tune trial runs ``run_trial``,
which fits a TorchTrainer whose RunConfig carries Tune's ``TuneReportCallback``: every
``ray.train.report`` of rank 0 reaches Tune (and ASHA) as a trial result. The Train run is named
after the trial's ledger name (``t003``, ``selfe.sweep.ledger``), so a trial restarted by Tune, or
by a later driver run of the sweep, resumes its own checkpoints and reuses its own MLflow child run. What a trial costs: ``selfe.sweep.resources``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selfe.config import Config
from selfe.sweep.ledger import TRIAL_KEY
from selfe.sweep.space import SweepSpec

SWEEP_TAG = "selfe.sweep"
TRIAL_TAG = "selfe.sweep_trial"
ROLE_TAG = "selfe.sweep_role"


@dataclass
class TrialContext:
    """What every trial shares, sent once through the object store (``tune.with_parameters``)."""

    spec: SweepSpec
    sweep_name: str
    train_storage: str
    """Where the trials' Train runs keep their checkpoints: inside the sweep's folder."""
    cache_path: str
    latent_shape: tuple[int, int, int]
    parent_run_id: str | None


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def parent_tags(sweep_name: str) -> dict[str, str]:
    """The tags that find a sweep's MLflow parent run."""
    return {SWEEP_TAG: sweep_name, ROLE_TAG: "parent"}


def trial_tags(sweep_name: str, trial_id: str) -> dict[str, str]:
    """The tags that find one trial's MLflow child run."""
    return {SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id}


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable: one TorchTrainer fit with this trial's overrides."""
    import ray.data
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from selfe.data.cache import load_cache, read_null_text
    from selfe.encoders.text import TextEncoder
    from selfe.train.handoff import worker_inputs
    from selfe.train.job import fit, tracking_target

    trial_id = str(params.get(TRIAL_KEY) or tune.get_context().get_trial_id())
    run_name = trial_run_name(context.sweep_name, trial_id)
    cfg = context.spec.trial_config(params)
    cfg.train.run_name = run_name
    cfg.train.storage_path = context.train_storage
    mlflow_run_id = None
    if cfg.tracking.enabled and context.parent_run_id:
        mlflow_run_id = child_run(cfg, context, trial_id, run_name, params)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per epoch per trial buries the log
    null = read_null_text(context.cache_path, cfg.data.s3_endpoint)
    inputs = worker_inputs(cfg, TextEncoder(cfg.text), null, context.latent_shape, tracking_target(cfg, mlflow_run_id),
                           cache_path=context.cache_path)
    result = fit(cfg, run_name, {"train": load_cache(context.cache_path, cfg)}, inputs,
                 callbacks=[TuneReportCallback()])
    if result.error is not None:
        raise RuntimeError(f"trial {trial_id} ({run_name}) failed: {result.error}") from result.error


def child_run(cfg: Config, context: TrialContext, trial_id: str, run_name: str, params: dict[str, Any]) -> str:
    """This trial's MLflow child run under the sweep's parent; the same one when the trial restarts."""
    from selfe.tracking.runs import find_or_start_run

    tags = {ROLE_TAG: "trial", **{f"sweep.{k}": str(v) for k, v in params.items() if k != TRIAL_KEY}}
    return find_or_start_run(cfg, run_name, match=trial_tags(context.sweep_name, trial_id), tags=tags,
                             parent_run_id=context.parent_run_id)
