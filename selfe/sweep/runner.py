"""The sweep driver: cache -> MLflow parent run -> Tuner over the ledger's trials -> best model registered.

Runs where ``ray job submit`` puts the entrypoint, or locally (starting Ray itself). Everything a
trial needs lives under ``<storage_path>/<sweep name>/``: the spec the sweep started with
(``selfe_sweep.json``), its ledger (``selfe_ledger.json``: every trial's parameters, outcome and
checkpoint), the Train checkpoints of every trial (``train_runs/``) and one Tune experiment folder
per driver run (``attempt-<n>/``). A sweep whose driver died or was stopped is continued by running
the same name again: it reads the two JSON files, never Tune's pickles (``selfe.sweep.ledger``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfe.config import Config
from selfe.configtools import ConfigError
from selfe.data.contract import latent_shape
from selfe.storage import train_storage
from selfe.sweep.ledger import LEDGER_FILE, TRIAL_KEY, Ledger, TrialRecord, start_attempt
from selfe.sweep.space import SweepSpec, grace_period, max_steps, param_space, spec_from_json, spec_to_json
from selfe.sweep.summary import (
    COMPLETED, FAILED, INTERRUPTED, STOPPED, TrialRow, best_row, markdown_table, plot_png, rows_from_ledger,
)
from selfe.sweep.trial import TrialContext, parent_tags, run_trial, trial_tags

SWEEP_BEST_ALIAS = "sweep-best"
SPEC_FILE = "selfe_sweep.json"
BEST_TRIAL_TAG = "selfe.sweep_best_trial"
BEST_VERSION_TAG = "selfe.sweep_best_version"
MLFLOW_STATUS = {COMPLETED: "FINISHED", STOPPED: "KILLED", INTERRUPTED: "KILLED", FAILED: "FAILED"}


@dataclass
class SweepResult:
    name: str
    path: str
    """The sweep folder (spec, ledger, checkpoints, one Tune experiment per driver run)."""
    resumed: bool
    rows: list[TrialRow]
    best: TrialRow | None
    parent_run_id: str | None
    model_version: int | None
    table: str
    out_dir: str
    plot_path: str | None
    wall_s: float


def default_sweep_name() -> str:
    return time.strftime("sweep-%Y%m%d-%H%M%S")


def trial_dirname(trial: Any) -> str:
    """Trial folders named by the trial's ledger name (``t003``), the same in every driver run."""
    return str(trial.config.get(TRIAL_KEY, trial.trial_id))


def _absolute_inputs(spec: SweepSpec, base: Config) -> None:
    """Trials run in their own working directories: pin the cache and the tracking URI."""
    from selfe.tracking.runs import resolve_tracking_uri

    if "://" not in base.data.cache_root:
        spec.base.append(f"--data.cache_root={Path(base.data.cache_root).resolve()}")
    if base.tracking.enabled:
        uri = resolve_tracking_uri(base)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
        spec.base.append(f"--tracking.tracking_uri={uri}")


def _read_text(path: str, fs: Any) -> str | None:
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def _write_text(path: str, text: str, fs: Any) -> None:
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def run_sweep(spec: SweepSpec, resume: bool = False, out_root: str = "outputs") -> SweepResult:
    """Run (or continue) the sweep ``spec`` and register its best model as ``@sweep-best``.

    A named sweep that exists under ``spec.storage_path`` continues with the spec it started with:
    finished trials are kept, the others run on from their last Train checkpoint, and planned trials
    that never started run. ``resume=True`` insists that the sweep exists.
    """
    import ray

    from selfe.data.cache import build_cache
    from selfe.sweep.resources import max_concurrent_trials
    from selfe.storage import ensure_ray

    t0 = time.time()
    spec, sweep_path, fs, restoring = _locate(spec, resume)
    ledger = read_ledger(sweep_path, fs)
    base = spec.base_config()
    ensure_ray()
    cache_path, manifest = build_cache(base)  # once, before any trial: every trial reads it
    concurrency = max_concurrent_trials(base, ray.cluster_resources(), spec.max_concurrent)
    parent_run_id = _parent_run(base, spec) if base.tracking.enabled else None
    uri = spec.storage_path.rstrip("/")  # the Train runs take the storage as given (fit() resolves URIs)
    runs = f"{uri}/{spec.name}/train_runs" if "://" in uri else f"{sweep_path}/train_runs"
    context = TrialContext(spec=spec, sweep_name=spec.name, train_storage=runs, cache_path=cache_path,
                           latent_shape=latent_shape(manifest), parent_run_id=parent_run_id)
    finished = ledger.finished()
    todo, new = start_attempt(spec, ledger)
    write_ledger(ledger, sweep_path, fs)
    print(f"[sweep] {spec.name}: {spec.search} search over {', '.join(spec.keys())}; up to {concurrency} trial(s) "
          f"at once; results in {sweep_path}", flush=True)
    if restoring:
        print(f"[sweep] resuming: {len(finished)} trial(s) finished, {len(todo)} to run on from their checkpoints, "
              f"{new} still to propose", flush=True)
    if todo or new:
        try:
            _fit(spec, base, context, ledger, (todo, new, finished), sweep_path, fs, concurrency)
        except BaseException as e:
            if parent_run_id:  # a sweep stopped or failed leaves no MLflow run RUNNING
                _end_runs_early(base, spec, ledger, parent_run_id, "KILLED" if isinstance(e, KeyboardInterrupt)
                                else "FAILED")
            raise
    rows = rows_from_ledger(ledger, spec)
    best = best_row(rows, spec.mode)
    out_dir = Path(out_root) / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, spec, best)
    (out_dir / "summary.md").write_text(table + "\n")
    png = plot_png(rows, spec)
    plot_path = str(out_dir / "sweep.png") if png else None
    if png:
        Path(plot_path).write_bytes(png)
    version = None
    if base.tracking.enabled:
        version = _finish_tracking(spec, base, rows, best, parent_run_id, table, png, out_dir, fs)
    elif best is not None:
        _export(spec, best, out_dir / "best_model", fs)
    return SweepResult(spec.name, sweep_path, restoring, rows, best, parent_run_id, version, table, str(out_dir),
                       plot_path, time.time() - t0)


def read_ledger(sweep_path: str, fs: Any) -> Ledger:
    """The sweep's ledger (empty for a new sweep): JSON, checked field by field."""
    where = f"{sweep_path}/{LEDGER_FILE}"
    text = _read_text(where, fs)
    return Ledger.from_json(text, where) if text is not None else Ledger()


def write_ledger(ledger: Ledger, sweep_path: str, fs: Any) -> None:
    """Write it whole, through a temporary name where the filesystem can rename (a driver killed
    mid-write leaves the previous ledger, not half of one; an S3 PUT is whole by itself)."""
    import pyarrow.fs as pafs

    where = f"{sweep_path}/{LEDGER_FILE}"
    fs = fs or pafs.LocalFileSystem()
    if isinstance(fs, pafs.LocalFileSystem):
        _write_text(where + ".tmp", ledger.to_json(), fs)
        fs.move(where + ".tmp", where)
    else:
        _write_text(where, ledger.to_json(), fs)


def _locate(spec: SweepSpec, resume: bool) -> tuple[SweepSpec, str, Any, bool]:
    """(spec to run, sweep folder, its filesystem, whether the sweep exists already). An existing
    sweep continues with the spec it started with, whatever the file says now."""
    spec = dataclasses.replace(spec, name=spec.name or default_sweep_name(), base=list(spec.base))
    storage, fs = train_storage(spec.storage_path, spec.base_config().data.s3_endpoint, resolve_uri=True)
    sweep_path = f"{storage}/{spec.name}"
    saved = _read_text(f"{sweep_path}/{SPEC_FILE}", fs)
    if resume and saved is None:
        raise ConfigError(f"cannot resume sweep {spec.name!r}: nothing to resume at {sweep_path} (no {SPEC_FILE}); "
                          "check [sweep] name / storage_path, or drop --resume to start it")
    if saved is not None:
        try:
            spec = spec_from_json(saved)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{sweep_path}/{SPEC_FILE} is damaged ({e}); start the sweep under a new name") from None
        print(f"[sweep] resuming {spec.name!r} from {sweep_path}", flush=True)
    else:
        _absolute_inputs(spec, spec.base_config())
        _write_text(f"{sweep_path}/{SPEC_FILE}", spec_to_json(spec), fs)
    return spec, sweep_path, fs, saved is not None


def _fit(spec: SweepSpec, base: Config, context: TrialContext, ledger: Ledger,
         plan: tuple[list[TrialRecord], int, list[TrialRecord]], sweep_path: str, fs: Any, concurrency: int) -> None:
    """One driver run: a fresh Tuner in ``attempt-<n>/`` over the trials ``plan`` names
    (to run from the ledger, new ones to propose, finished ones to learn from)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from selfe.sweep.resources import TRIAL_DRIVER_CPUS, ReleaseStoppedTrialGroups, keep_credentials_out_of_trials
    from selfe.sweep.resume import LedgerCallback, PlannedSearcher, ReplayedASHA

    keep_credentials_out_of_trials()
    todo, new, finished = plan
    inner = None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        inner = OptunaSearch(seed=spec.seed)  # metric and mode come from TuneConfig: Tune refuses them twice
    searcher = PlannedSearcher(todo, new, len(ledger.trials), inner, finished)
    scheduler = None
    if spec.asha.enabled:  # rungs counted in training steps, the unit every trial reports
        # stop_last_trials=False: a trial that reaches max_t ends by itself, so its Train run finishes
        # cleanly (final checkpoint, MLflow flush) instead of being cut off at its last report.
        scheduler = ReplayedASHA([r.history for r in finished], time_attr="step", max_t=max_steps(spec, base),
                                 grace_period=grace_period(spec, base), reduction_factor=spec.asha.reduction_factor,
                                 stop_last_trials=False)
    record = LedgerCallback(ledger, lambda led: write_ledger(led, sweep_path, fs), spec.metric,
                            lambda params: spec.trial_config(params).train.steps, scheduler)
    # The trial actor only drives a TorchTrainer, whose workers reserve their own CPUs.
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_DRIVER_CPUS})
    tuner = tune.Tuner(
        trainable, param_space=param_space(spec) if inner is not None else None,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode,
                                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
                                    scheduler=scheduler, num_samples=len(todo) + new,
                                    time_budget_s=spec.time_budget_s or None, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=f"attempt-{ledger.attempts - 1}", storage_path=sweep_path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  callbacks=[record, ReleaseStoppedTrialGroups()], verbose=1),
    )
    try:
        tuner.fit()
    finally:
        write_ledger(ledger, sweep_path, fs)


def _parent_run(base: Config, spec: SweepSpec) -> str:
    """The sweep's MLflow parent run (the existing one when the sweep resumes)."""
    from selfe.tracking.runs import find_or_start_run, log_run_file, log_run_text

    run_id = find_or_start_run(base, spec.name, match=parent_tags(spec.name),
                               tags={"selfe.sweep_space": spec.source, "selfe.sweep_search": spec.search})
    log_run_text(run_id, spec_to_json(spec), "sweep/spec.json")
    if spec.source and os.path.isfile(spec.source):
        log_run_file(run_id, spec.source, "sweep")
    return run_id


def _end_runs_early(base: Config, spec: SweepSpec, ledger: Ledger, parent_run_id: str, status: str) -> None:
    """End the parent run with ``status`` and every trial's child run still RUNNING with KILLED; a
    tracking store that is down is not the error to report."""
    import contextlib

    from mlflow import MlflowClient

    from selfe.tracking.runs import end_run, find_run

    with contextlib.suppress(Exception):
        for key in ledger.trials:
            child = find_run(base.tracking.experiment, trial_tags(spec.name, key))
            if child and MlflowClient().get_run(child).info.status == "RUNNING":
                end_run(child, "KILLED")
        end_run(parent_run_id, status)


def _export(spec: SweepSpec, best: TrialRow, model_dir: Path, fs: Any) -> None:
    from ray.train import Checkpoint

    from selfe.train.job import export_model

    export_model(spec.trial_config(best.params), Checkpoint(best.checkpoint_path, filesystem=fs), model_dir)


def _finish_tracking(spec: SweepSpec, base: Config, rows: list[TrialRow], best: TrialRow | None, parent_run_id: str,
                     table: str, png: bytes | None, out_dir: Path, fs: Any) -> int | None:
    """Close the child runs with their outcome, register the best model, log the summary to the parent."""
    from selfe.tracking.registry import log_and_register
    from selfe.tracking.runs import end_run, find_run, run_tags, set_run_tags
    from selfe.tracking.runlog import RunLogger

    for row in rows:
        row.child_run_id = find_run(base.tracking.experiment, trial_tags(spec.name, row.trial_id))
    version = None
    parent = run_tags(parent_run_id)
    if best is not None:
        if parent.get(BEST_TRIAL_TAG) == best.trial_id and BEST_VERSION_TAG in parent:
            version = int(parent[BEST_VERSION_TAG])  # a finished sweep, rerun: registered already
        else:
            _export(spec, best, out_dir / "best_model", fs)
            version = log_and_register(best.child_run_id or parent_run_id, out_dir / "best_model",
                                       base.tracking.registered_model, SWEEP_BEST_ALIAS, promote_champion=False)
            set_run_tags(parent_run_id, {BEST_TRIAL_TAG: best.trial_id, BEST_VERSION_TAG: version,
                                         **{f"sweep.best.{k}": v for k, v in best.params.items()}})
    for row in rows:
        if row.child_run_id:
            set_run_tags(row.child_run_id, {"selfe.sweep_outcome": row.outcome})
            end_run(row.child_run_id, MLFLOW_STATUS[row.outcome])
    logger = RunLogger(parent_run_id)
    metrics = {"trials": len(rows), "trials_stopped_early": sum(r.outcome == STOPPED for r in rows),
               "trials_failed": sum(r.outcome == FAILED for r in rows)}
    if best is not None and best.metric is not None:
        metrics[f"best_{spec.metric}"] = best.metric
    logger.log_metrics(metrics, 0)
    logger.log_artifact_bytes(table.encode(), "sweep/summary.md")
    if png:
        logger.log_artifact_bytes(png, "sweep/sweep.png")
    end_run(parent_run_id)
    return version
