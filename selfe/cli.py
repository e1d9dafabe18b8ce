"""What every pipeline's command line shares: one style for every refusal (``<script>: error: <what and
the fix>`` on one stderr line, exit 2, found before any work where the input alone shows it), loading
and ``--print-config`` of a job config (``loaded``), and the closing summary (``print_fields``)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Callable, TypeVar

from selfe.configtools import MODEL_URI, NAME_PATTERN

T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is the single line "prog: error: ..." (no usage block) and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str) -> int:
    """Report a problem found after parsing (e.g. the registry has no such model); returns 2."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    return 2


def loaded(load: Callable[[], T], show: Callable[[T], str] | None = None) -> T | int:
    """``load()`` (a config, validated), or the exit code: 2 after its ConfigError as the one-line error,
    0 after printing ``show(config)`` (``--print-config``, ``--print-space``)."""
    from selfe.configtools import ConfigError

    try:
        value = load()
    except ConfigError as e:
        return fail(str(e))
    if show is not None:
        print(show(value))
        return 0
    return value


def print_fields(fields: list[tuple[str, str]]) -> None:
    """A job's closing summary: ``label:`` padded to one column, then the value, one line each."""
    for label, value in fields:
        print(f"{label + ':' if label else '':<17}{value}")


def unwritable(folder: str | Path, setting: str = "--out", endpoint: str = "") -> str | None:
    """None when ``folder`` (local or s3://) can be written (it is created if missing), else the
    one-line problem naming ``setting``: checked before a model is loaded or an image sampled."""
    from selfe.storage import NotWritable, check_writable

    try:
        check_writable(str(folder), setting, endpoint)
    except NotWritable as e:
        return str(e)
    return None


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan/inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def utf8_text(text: str) -> str:
    """argparse type: text that is valid UTF-8 (undecodable bytes arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{text.encode('utf-8', 'surrogateescape')[:40]!r} is not valid UTF-8; pass prompts as UTF-8 text"
        ) from None
    return text


def model_ref(text: str) -> str:
    """argparse type: an existing folder, ``models:/name@alias``, ``models:/name/<version>`` or
    ``runs:/<run id>/<path>``."""
    if Path(text).is_dir():
        return text
    forms = "give a model folder, models:/name@alias, models:/name/<version> or runs:/<run id>/model"
    if text.startswith("runs:/"):
        run_id, _, path = text[len("runs:/"):].partition("/")
        if run_id and path:
            return text
        raise argparse.ArgumentTypeError(f"{text!r} is incomplete; {forms}")
    m = MODEL_URI.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a folder nor a model URI; {forms}")
    if not NAME_PATTERN.match(m["name"]) or (m["alias"] and not NAME_PATTERN.match(m["alias"])):
        raise argparse.ArgumentTypeError(f"{text!r}: names and aliases use letters, digits, '.', '_' or '-'")
    if m["version"] is not None and not m["version"].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a version is a number, e.g. models:/selfe/3")
    return text


def device_name(text: str) -> str:
    """argparse type: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (whether it exists here is checked at load)."""
    if text in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:N or auto")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option shared by the pipelines that load a model."""
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:N or auto (default: the first GPU if one is visible, else cpu)")


def missing_sqlite_store(uri: str) -> str | None:
    """For a ``sqlite:///`` tracking URI whose file does not exist, the error to give (MLflow would
    create an empty registry there and report the model as missing); else None."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return (f"no MLflow database at {uri[len('sqlite:///'):]}; run from the folder training ran in, "
                "or pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    return None


def load_model_or_fail(ref: str, tracking_uri: str | None = None, device: str = "auto"):
    """Point MLflow at ``tracking_uri`` (else $MLFLOW_TRACKING_URI or ./mlflow.db) and load ``ref`` on
    ``device`` with ``selfe.tracking.registry.load_model_ref``. A missing store, registry miss,
    unreadable model, unloadable encoder or absent device is printed as one line and gives None."""
    import os

    from selfe.tracking.runs import TrackingError, resolve_tracking_uri, use_tracking_uri
    from selfe.tracking.registry import load_model_ref

    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per encoder is noise on a one-shot command
    uri = resolve_tracking_uri()
    if not Path(ref).is_dir() and (problem := missing_sqlite_store(uri)):
        fail(problem)
        return None
    use_tracking_uri(uri)
    try:
        return load_model_ref(ref, device=device)
    except (TrackingError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load model {ref}: {first}")
        return None
