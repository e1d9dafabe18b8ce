"""Where the served model comes from: a registry alias (followed), a pinned version or a folder.

``load_served`` resolves the reference to one registry version, loads that version (never the alias
itself, which may move while it downloads) and runs a warm-up sample. ``AliasFollower`` looks the alias
up every ``poll_s`` seconds; when it points elsewhere the new version is loaded beside the old one and
swapped in with one assignment, so requests in flight finish on the version they started with. A
version that fails to load is logged and skipped (the old one keeps serving) until the alias moves again.
A replica that starts (or is restarted) while the alias points at such a version serves the version the
application was deployed with (``fallback``), and says so in ``last_error``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfe.configtools import MODEL_URI
from selfe.generator import ImageGenerator, load_generator
from selfe.tracking.registry import model_dir_for

log = logging.getLogger("selfe.serve")
FEW_STEPS = 2
"""A Self-E model's default serving steps: the few-step setting it is trained for."""


@dataclass
class ModelVersion:
    """What a reference points at now: registry name, version, alias and run (None for a folder)."""

    ref: str
    name: str | None = None
    version: int | None = None
    alias: str | None = None
    run_id: str | None = None

    @property
    def pinned(self) -> str:
        """A URI of exactly this version (the folder for a folder reference)."""
        return self.ref if self.version is None else f"models:/{self.name}/{self.version}"


@dataclass
class ServedModel:
    generator: ImageGenerator
    version: ModelVersion
    default_steps: int
    warmup_s: float
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        """``GET /v1/model``: where the model comes from and how it samples by default."""
        cfg = self.generator.cfg
        sc = self.generator.sampler(self.default_steps)
        return {"ref": self.version.ref, "name": self.version.name, "version": self.version.version,
                "alias": self.version.alias, "run_id": self.version.run_id, "method": cfg.objective.method,
                "resolution": cfg.data.resolution,
                "sampler": {"steps": self.default_steps, "guidance": sc.guidance, "eta": sc.eta,
                            "eta_per_step": cfg.sampler.eta is None, "landing": sc.landing},
                "loaded_at": self.loaded_at, "warmup_s": round(self.warmup_s, 3)}


def resolve_version(ref: str) -> ModelVersion:
    """Look ``ref`` up in the registry (the tracking URI already set): its version and run now."""
    m = MODEL_URI.match(ref)
    if m is None or not (m["alias"] or m["version"].isdigit()):
        if ref.startswith(("models:/", "runs:/")) or not Path(ref).is_dir():
            raise ValueError(f"model {ref!r}: give models:/name@alias, models:/name/<version> or a model folder")
        return ModelVersion(ref)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if m["alias"]:
        mv = client.get_model_version_by_alias(m["name"], m["alias"])
    else:
        mv = client.get_model_version(m["name"], m["version"])
    return ModelVersion(ref, m["name"], int(mv.version), m["alias"], mv.run_id)


def pinned_version(of: ModelVersion, version: int) -> ModelVersion:
    """``version`` of the same registered model (its own run), still named by ``of``'s alias reference."""
    from mlflow.tracking import MlflowClient

    mv = MlflowClient().get_model_version(of.name, str(version))
    return ModelVersion(of.ref, of.name, int(mv.version), of.alias, mv.run_id)


def load_served(version: ModelVersion, device: str = "auto") -> ServedModel:
    """Load ``version`` (pinned) and sample one image at its default steps, so the first request does not
    pay for lazy initialisation and a model that cannot sample is found before it serves."""
    gen = load_generator(model_dir_for(version.pinned), device=device)
    steps = FEW_STEPS if gen.cfg.objective.method == "self_e" else gen.cfg.sampler.steps
    t0 = time.perf_counter()
    gen.generate(["warm-up"], steps=steps, seed=0)
    return ServedModel(gen, version, steps, time.perf_counter() - t0)


class AliasFollower:
    """Holds the served model (``current``) and, for an alias reference, keeps it on the alias's version."""

    def __init__(self, ref: str, device: str = "auto", poll_s: float = 10.0, fallback: int | None = None) -> None:
        self.ref, self.device, self.poll_s = ref, device, poll_s
        self.last_error: dict | None = None
        self._failed: int | None = None  # a version that would not load: not retried until the alias moves
        first = resolve_version(ref)
        try:
            self.current = load_served(first, device)
        except Exception as e:
            if not (first.alias and fallback and fallback != first.version):
                raise
            self._failed = first.version
            self.last_error = {"version": first.version, "during": "load", "error": _first_line(e), "at": time.time()}
            log.error("version %s of %s did not load (%s); serving version %s, the one deployed", first.version,
                      ref, _first_line(e), fallback)
            self.current = load_served(pinned_version(first, fallback), device)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.current.version.alias and poll_s > 0:
            self._thread = threading.Thread(target=self._watch, name="selfe-alias-follower", daemon=True)
            self._thread.start()

    def check(self) -> bool:
        """Look the alias up once; load and swap in a new version. True when the served version changed."""
        try:
            now = resolve_version(self.ref)
        except Exception as e:  # the registry is unreachable for a moment: keep serving, say why
            self.last_error = {"during": "registry lookup", "error": _first_line(e), "at": time.time()}
            log.warning("registry lookup of %s failed (%s); still serving version %s", self.ref,
                        _first_line(e), self.current.version.version)
            return False
        if now.version in (self.current.version.version, self._failed):
            return False
        log.info("%s moved to version %s (serving %s): loading it", self.ref, now.version,
                 self.current.version.version)
        try:
            fresh = load_served(now, self.device)
        except Exception as e:  # a broken version must not take the served one down
            self._failed = now.version
            self.last_error = {"version": now.version, "during": "load", "error": _first_line(e), "at": time.time()}
            log.error("version %s of %s did not load (%s); still serving version %s", now.version, self.ref,
                      _first_line(e), self.current.version.version)
            return False
        old, self.current, self._failed = self.current, fresh, None
        log.info("now serving version %s of %s (was %s)", now.version, self.ref, old.version.version)
        return True

    def following(self) -> bool:
        """False only when this follower should watch the alias and its thread has died."""
        return self._thread is None or self._stop.is_set() or self._thread.is_alive()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def close(self) -> None:
        self._stop.set()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
