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


def tracking_folder(uri: str) -> str | None:
    """The local folder a tracking URI writes to (a SQLite file's folder, a file store), else None
    (a server, a database: reached, not written as files)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent)
    if uri.startswith("file:"):
        return uri.removeprefix("file://").removeprefix("file:")
    if "://" not in uri:
        return uri
    return None


def check_outputs(cfg: Config, out: str | None = None, storage_setting: str = "train.storage_path") -> None:
    """Every place a training job writes (``out``, ``train.storage_path`` (named ``storage_setting``
    in the message), ``data.cache_root`` and the MLflow store's folder), checked for writing before
    any work starts.

    Raises:
        ConfigError: one line naming the setting that cannot be written and why.
    """
    from selfe.storage import NotWritable, check_writable

    places = [(out, "--out")] if out is not None else []
    places += [(cfg.train.storage_path, storage_setting), (cfg.data.cache_root, "data.cache_root")]
    if cfg.tracking.enabled:
        uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
        folder = tracking_folder(uri)
        if folder is not None:
            places.append((folder or ".", "tracking.tracking_uri (its folder)"))
    for location, setting in places:
        try:
            check_writable(location, setting, cfg.data.s3_endpoint)
        except NotWritable as e:
            raise ConfigError(str(e)) from None
