"""MLflow runs: the tracking URI, experiments, creating, finding, tagging and ending runs, and the
retry that rides out a short server outage. Metrics that survive an unreachable server are
``selfe.tracking.runlog``."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import mlflow
from mlflow.tracking import MlflowClient

from selfe.config import Config
from selfe.configtools import flatten

T = TypeVar("T")

# MLflow errors that retrying cannot fix: the request itself is wrong or not allowed.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
              "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST"}


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within the deadline."""


def with_retries(what: str, fn: Callable[[], T], deadline_s: float = 120.0, pause_s: float = 5.0) -> T:
    """``fn()``, retried every ``pause_s`` while the server is unreachable, for up to ``deadline_s``
    (a short outage at run creation or registration must not end a job). Errors in the request
    itself are raised at once."""
    deadline = time.time() + deadline_s
    while True:
        try:
            return fn()
        except mlflow.exceptions.MlflowException as e:
            if e.error_code in _PERMANENT:
                raise
            error: Exception = e
        except OSError as e:  # connection refused / reset before MLflow wraps it
            error = e
        if time.time() + pause_s > deadline:
            raise TrackingUnavailable(f"MLflow did not answer for {deadline_s:.0f} s while {what}: "
                                      f"{str(error).splitlines()[0][:300]}") from error
        warnings.warn(f"MLflow unreachable while {what}; retrying in {pause_s:.0f} s", stacklevel=2)
        time.sleep(pause_s)


def resolve_tracking_uri(cfg: Config | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else SQLite in the working directory."""
    uri = (cfg.tracking.tracking_uri if cfg else "") or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup_tracking(cfg: Config) -> str:
    """Point this process (and, via the environment, its children) at the tracking server."""
    uri = resolve_tracking_uri(cfg)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def get_or_create_experiment(name: str) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        # SQLite stores metadata only; keep artifacts beside the database, not in ./mlruns.
        db = Path(mlflow.get_tracking_uri().removeprefix("sqlite:///"))
        location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


_URI_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s\"']+@")


def redact_uri(text: str) -> str:
    """Hide the user:password part of every URI in ``text`` (``postgresql://u:p@h/db`` ->
    ``postgresql://***@h/db``): params and config artifacts are readable by anyone with run access."""
    return _URI_CREDENTIALS.sub(r"\g<scheme>***@", text)


def start_run(cfg: Config, run_name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Create a run with the resolved config as params and as an artifact; returns its id."""
    client = MlflowClient()
    exp_id = get_or_create_experiment(cfg.tracking.experiment)
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
    client.log_text(run.info.run_id, redact_uri(cfg.dump()), "config.toml")
    params = {k: redact_uri(json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flatten(cfg).items()}
    items = list(params.items())
    for i in range(0, len(items), 90):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[i:i + 90]])
    return run.info.run_id


TrackingError = mlflow.exceptions.MlflowException
"""What the MLflow client raises; callers outside this package catch it by this name."""


def use_tracking_uri(uri: str | None = None) -> str:
    """Point this process at ``uri`` (else $MLFLOW_TRACKING_URI, else ./mlflow.db); returns it."""
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    resolved = resolve_tracking_uri()
    mlflow.set_tracking_uri(resolved)
    return resolved


def _query(match: dict[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in match.items())


def find_run(experiment: str, match: dict[str, str]) -> str | None:
    """The id of a run in ``experiment`` carrying every tag in ``match``, or None."""
    exp_id = get_or_create_experiment(experiment)
    found = MlflowClient().search_runs([exp_id], _query(match), max_results=1)
    return found[0].info.run_id if found else None


def find_or_start_run(cfg: Config, run_name: str, match: dict[str, str], tags: dict[str, str] | None = None,
                      parent_run_id: str | None = None) -> str:
    """The run of ``cfg.tracking.experiment`` tagged with ``match`` (a resumed job, a restarted trial,
    a rerun sweep finds its own run), else a new one tagged with ``match`` and ``tags``. Points this
    process at the tracking server first and retries through a short outage."""
    setup_tracking(cfg)

    def find_or_start() -> str:
        found = find_run(cfg.tracking.experiment, match)
        if found:  # a run that ended (KILLED, FAILED) and goes on is running again
            MlflowClient().update_run(found, status="RUNNING")
            return found
        return start_run(cfg, run_name, tags={**match, **(tags or {})}, parent_run_id=parent_run_id)

    return with_retries(f"creating the run {run_name}", find_or_start)


def run_tags(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.tags)


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def end_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


def log_run_text(run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, text, artifact_file)


def log_run_file(run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_dir)


def log_evaluation(name: str, tags: dict[str, str], metrics: dict[str, float], artifacts_dir: str | Path) -> str:
    """A standalone run in the default experiment holding one evaluation: metrics at step 0 and the
    folder of its outputs under ``eval/``; returns the run id."""
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags(tags)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(artifacts_dir), "eval")
    return run.info.run_id
