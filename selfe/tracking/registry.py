"""What goes into the registry and how it comes back out.

Out: ``model_dir_for`` resolves ``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model`` or a
local folder written by ``save_model_dir`` to a local model folder.

In: ``stage_model_dir`` makes the folder that is logged, so that anyone who can read the registry can
load the model. Encoders that live where only the training account can read (an ``s3://`` prefix, a
local folder) are copied into ``encoders/text`` and ``encoders/codec`` when they are at most
``bundle_limit_mb`` (``$SELFE_BUNDLE_LIMIT_MB``, default 2048: a FLUX/SD VAE or MiniLM travels, a
T5-XXL does not). Hub ids and the pip-installed MiniLM (``"minilm"``) are resolvable anywhere and are
only named. ``model_info.json`` records, per encoder, ``{"source": ..., "bundled": folder or null}``;
an unbundled one is loaded from its source, or from ``$SELFE_TEXT_ENCODER`` / ``$SELFE_CODEC_PATH``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from selfe.config import Config, load_config
from selfe.generator import CONFIG, INFO, WEIGHTS, ImageGenerator, load_generator

CHAMPION = "champion"
BUNDLE_LIMIT_ENV = "SELFE_BUNDLE_LIMIT_MB"
DEFAULT_BUNDLE_LIMIT_MB = 2048.0
# Training-only dependencies: a loaded model needs neither (pyarrow stays: selfe.storage reads s3:// with it).
_NOT_AT_INFERENCE = {"ray", "mlflow"}


def model_dir_for(ref: str) -> Path:
    local = Path(ref)
    if local.is_dir():
        return local
    if not ref.startswith(("models:/", "runs:/")):
        raise ValueError(f"model {ref!r} is neither a folder nor an MLflow URI (models:/name@alias, runs:/id/model)")

    root = download_model_artifacts(ref)
    found = [p.parent for p in root.rglob(WEIGHTS)]
    if not found:
        raise FileNotFoundError(f"{ref} holds no {WEIGHTS}; was it logged by selfe?")
    return found[0]


def load_model_ref(ref: str, device: str = "cpu") -> ImageGenerator:
    """An ImageGenerator for a registry reference or local folder, on ``device`` (cpu, cuda, cuda:N, auto)."""
    return load_generator(model_dir_for(ref), device=device)


def bundle_limit_mb() -> float:
    """The largest encoder folder (MB) copied into a logged model: ``$SELFE_BUNDLE_LIMIT_MB`` or 2048."""
    text = os.environ.get(BUNDLE_LIMIT_ENV, "")
    try:
        return float(text) if text else DEFAULT_BUNDLE_LIMIT_MB
    except ValueError:
        raise ValueError(f"{BUNDLE_LIMIT_ENV}={text!r} is not a number of megabytes") from None


def stage_model_dir(model_dir: str | Path, staging: str | Path, limit_mb: float | None = None) -> Path:
    """``staging/model_dir``: ``model_dir``'s files (hard links where possible, so multi-GB weights are
    not copied), the encoders that need bundling, and a ``model_info.json`` that names them."""
    src, out = Path(model_dir), Path(staging) / "model_dir"
    if not (src / WEIGHTS).is_file():
        raise FileNotFoundError(f"{src} holds no {WEIGHTS}; expected a folder written by save_model_dir")
    out.mkdir(parents=True)
    for name in (WEIGHTS, CONFIG):
        _link_or_copy(src / name, out / name)
    cfg = load_config(src / CONFIG)
    limit = bundle_limit_mb() if limit_mb is None else limit_mb
    info = json.loads((src / INFO).read_text()) if (src / INFO).is_file() else {}
    info["encoders"] = {"text": _bundle(cfg.text.name, out / "encoders" / "text", limit)}
    if cfg.codec.kind != "pixels":
        info["encoders"]["codec"] = _bundle(cfg.codec.path, out / "encoders" / "codec", limit)
    (out / INFO).write_text(json.dumps(info, indent=2))
    return out


def _bundle(location: str, dest: Path, limit_mb: float) -> dict[str, str | float | None]:
    """Copy the encoder at ``location`` to ``dest`` when it is a readable folder of at most ``limit_mb``."""
    from selfe.encoders.storage import MINILM, is_hub_id, resolve_model_dir

    record: dict[str, str | float | None] = {"source": location, "bundled": None}
    if location == MINILM or is_hub_id(location):
        return record  # resolvable wherever the package (pip requirement) or the hub is
    folder = Path(resolve_model_dir(location))  # s3:// is mirrored with the training job's credentials
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    record["size_mb"] = round(size_mb, 1)
    if size_mb > limit_mb:
        return record
    for file in folder.rglob("*"):
        if file.is_file() and not file.name.startswith("."):
            (dest / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(file, dest / file.relative_to(folder))
    record["bundled"] = dest.relative_to(dest.parent.parent).as_posix()
    return record


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def pip_requirements() -> list[str]:
    """This package's runtime requirements (pyproject.toml, one source of truth) minus the
    training-only ones; MLflow adds its own pin."""
    try:
        declared = importlib.metadata.requires("selfe") or []
    except importlib.metadata.PackageNotFoundError:  # run from a checkout (e.g. a Ray working_dir)
        declared = _pyproject_requirements()
    out = []
    for req in declared:
        if "extra ==" in req:
            continue
        name = re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()
        if name not in _NOT_AT_INFERENCE:
            out.append(req)
    return out


def _pyproject_requirements() -> list[str]:
    import tomllib

    import selfe

    pyproject = Path(selfe.__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError("selfe is neither installed nor next to its pyproject.toml: cannot list the "
                                "model's pip requirements; `pip install -e .` first")
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def model_signature(cfg: Config):
    """Input: a list of prompts; output: uint8 images (N, H, W, 3); params with the model's sampler
    defaults: steps, guidance, seed, eta and landing."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    sampler = cfg.sampler
    params = ParamSchema([
        ParamSpec("steps", DataType.long, sampler.steps),
        ParamSpec("guidance", DataType.double, float(sampler.guidance)),
        ParamSpec("seed", DataType.long, 0),
        # None: the sampler's per-step default for each request's step count (selfe.core.sampling.resolve_sampler).
        ParamSpec("eta", DataType.double, None if sampler.eta is None else float(sampler.eta)),
        ParamSpec("landing", DataType.string, sampler.landing),
    ])
    side = cfg.data.resolution
    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, side, side, 3))]), params=params)


def download_model_artifacts(ref: str) -> Path:
    """Download a ``models:/`` or ``runs:/`` URI to a local folder."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))


def log_and_register(run_id: str, model_dir: str | Path, name: str, alias: str, promote_champion: bool) -> int:
    """Log ``model_dir`` as a pyfunc model in ``run_id``, register it as ``name`` and set aliases.
    Returns the new version number.

    The model is logged from code (``selfe/tracking/pyfunc.py``), not cloudpickled: loading it imports
    that file and this package, and unpickles nothing. Encoders only this account can read travel with
    it (``stage_model_dir``); the signature declares prompts in, uint8 images
    out and the sampler params; the pip requirements are this package's runtime ones."""
    import tempfile

    import selfe

    code_root = Path(selfe.__file__).parent
    with tempfile.TemporaryDirectory(prefix="selfe-model-") as staging, mlflow.start_run(run_id=run_id):
        staged = stage_model_dir(model_dir, staging)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code_root / "tracking" / "pyfunc.py"),
            artifacts={"model_dir": str(staged)},
            code_paths=[str(code_root)],
            pip_requirements=pip_requirements(),
            # Declared so that load_model(uri, model_config={...}) may override them ("" = not set).
            model_config={"device": "auto", "text_encoder": "", "codec_path": ""},
        )
    # The type hint gives the input schema only; the params (with this model's defaults) and the image
    # output are declared here, after logging, because a signature passed to log_model that differs
    # from the type-hinted one is replaced by it.
    mlflow.models.set_signature(info.model_uri, model_signature(load_config(Path(model_dir) / CONFIG)))
    version = mlflow.register_model(info.model_uri, name)
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, version.version)
    if promote_champion:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return int(version.version)
