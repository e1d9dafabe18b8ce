"""Where a job's outputs land when a setting is relative, so that they outlive the process.

``ray job submit --working-dir .`` runs the entrypoint inside Ray's unpacked copy of the working
directory (``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), which Ray deletes
when the package is evicted or the session ends. Relative defaults (``outputs/``, ``./mlflow.db``)
would put the registry, checkpoints and exported model there. ``$SELFE_HOME`` names a durable
folder that every relative setting resolves under; inside a Ray working-directory copy without it,
the job refuses to start and says which settings to give.
"""

from __future__ import annotations

import os
from pathlib import Path

from selfe.config import Config
from selfe.configtools import ConfigError

HOME_ENV = "SELFE_HOME"
# Set by Ray's job supervisor in the environment of a submitted job's entrypoint.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_working_dir_copy(cwd: str | Path | None = None) -> bool:
    """True for a submitted Ray job whose working directory is Ray's temporary package copy."""
    return RAY_JOB_ENV in os.environ and "runtime_resources" in Path(cwd or os.getcwd()).parts


def _relative(location: str) -> bool:
    if location.startswith("sqlite:///"):
        return not Path(location[len("sqlite:///"):]).is_absolute()
    return "://" not in location and not Path(location).is_absolute()


def anchor_outputs(cfg: Config, out: str) -> str:
    """Resolve the job's relative output settings (in place on ``cfg``) and return ``out`` resolved.

    With ``$SELFE_HOME`` set, relative ``train.storage_path``, ``data.cache_root`` and ``out`` move
    under it, and a tracking URI that would default to ``./mlflow.db`` becomes
    ``sqlite:///$SELFE_HOME/mlflow.db`` (its artifacts land beside it). Without it, paths stay as
    given, except in a Ray working-directory copy, where any relative one is a ConfigError."""
    settings = {"train.storage_path": cfg.train.storage_path, "data.cache_root": cfg.data.cache_root, "--out": out}
    relative = [name for name, value in settings.items() if _relative(value)]
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    uri_relative = cfg.tracking.enabled and (not uri or _relative(uri))
    home = os.environ.get(HOME_ENV)
    if home:
        base = Path(home).expanduser().resolve()
        base.mkdir(parents=True, exist_ok=True)
        if _relative(cfg.train.storage_path):
            cfg.train.storage_path = str(base / cfg.train.storage_path)
        if _relative(cfg.data.cache_root):
            cfg.data.cache_root = str(base / cfg.data.cache_root)
        if uri_relative:
            name = uri[len("sqlite:///"):] if uri else "mlflow.db"
            cfg.tracking.tracking_uri = f"sqlite:///{base / name}"
        return str(base / out) if _relative(out) else out
    if in_ray_working_dir_copy() and (relative or uri_relative):
        named = relative + (["tracking.tracking_uri"] if uri_relative else [])
        raise ConfigError(
            f"this Ray job runs in Ray's temporary copy of the working directory ({os.getcwd()}), which Ray "
            f"deletes; set {HOME_ENV} to a durable folder in the job's env "
            f"(--runtime-env-json '{{\"env_vars\": {{\"{HOME_ENV}\": \"/data/selfe\"}}}}') or give absolute "
            f"values for: {', '.join(named)}"
        )
    return out
