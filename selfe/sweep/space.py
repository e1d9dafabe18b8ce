"""A sweep's definition, read from TOML and checked before any work starts.

Layout of a space file (see ``tune/default.toml``)::

    [sweep]                      # how to search (every key optional; defaults in SweepSpec)
    name = "fm-vs-selfe"         # explicit name: rerunning it resumes the sweep
    search = "grid"              # grid | random | optuna
    [sweep.asha]                 # early stopping on the few-step score
    grace_period = 40
    [base]                       # overrides for every trial, as on the pipelines/train.py command line
    "train.steps" = 120
    [space]                      # one entry per swept config key
    "objective.self_eval_weight" = { values = [0.5, 1.0, 2.0] }
    anneal_fraction = { uniform = [0.1, 0.6] }

Distributions: ``values`` (grid search crosses them; random and Optuna pick among them),
``uniform`` / ``loguniform`` ``[low, high]`` and ``randint`` ``[low, high]`` (both ends included);
the last three need ``search = "random"`` or ``"optuna"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfe.config import Config, load_config
from selfe.configtools import ConfigError, check_name, parse_overrides
from selfe.eval.metrics import METRIC_MODES, periodic_metrics, ranking_metric

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SEARCHES = ("grid", "random", "optuna")
DISTRIBUTIONS = ("values", "uniform", "loguniform", "randint")
SELF_EVAL_WEIGHT = "objective.self_eval_weight"
HORIZON = "anneal_fraction"
# Keys that change the encoded cache (built once for the whole sweep) or that the sweep sets itself.
CACHE_PREFIXES = ("data.", "text.", "codec.")
SWEEP_OWNED = ("preset", "train.run_name", "train.storage_path")


@dataclass
class AshaSpec:
    """Asynchronous successive halving on ``metric``, in units of training steps."""

    enabled: bool = True
    grace_period: int = 0
    """Steps every trial runs before it can be stopped; 0: train.eval_every (its first real score)."""
    reduction_factor: float = 2.0
    """Keep the best 1/reduction_factor of the trials at each rung."""
    max_t: int = 0
    """Last rung; 0: train.steps."""


@dataclass
class Dimension:
    """One swept config key and its distribution."""

    key: str
    kind: str
    args: list[Any]
    """The listed values, or [low, high] of a range."""


@dataclass
class SweepSpec:
    """Everything one sweep needs besides the cluster."""

    name: str = ""
    """Sweep name; an existing one resumes that sweep. Empty: a fresh timestamped name."""
    search: str = "grid"
    num_samples: int = 1
    """grid: repeats of the whole grid; random / optuna: number of trials (the reference comes on top)."""
    metric: str = ""
    """The reported metric Tune/ASHA ranks trials by; empty: the base config's eval suite decides
    (``geneval_fewstep`` for GenEval-lite, ``fid_fewstep`` for clip_fid)."""
    mode: str = ""
    """"max" or "min"; empty: the metric's own direction (min for FID, max for the scores; max for others)."""
    max_concurrent: int = 0
    """Trials at once; 0: as many as the cluster's CPUs (and GPUs) hold without starving Ray Data."""
    storage_path: str = "outputs/sweeps"
    """Tune experiment folder (local or s3://); every trial's Train checkpoints live inside it."""
    reference: bool = False
    """Add one flow-matching trial (objective.self_eval_weight = 0, other values at their first entry)."""
    seed: int = 0
    """Seed of the random / Optuna search."""
    config: str = ""
    """Base training config TOML (as ``pipelines/train.py --config``); empty: the preset."""
    max_failures: int = 1
    """Times Tune restarts a failed trial (its Train run resumes from its last checkpoint)."""
    time_budget_s: float = 0.0
    """Stop the sweep after this many seconds (running trials are ended); 0: no limit."""
    asha: AshaSpec = field(default_factory=AshaSpec)
    base: list[str] = field(default_factory=list)
    """``--key=value`` overrides applied to every trial."""
    space: list[Dimension] = field(default_factory=list)
    source: str = ""
    """The TOML file this spec came from (logged with the sweep)."""

    def keys(self) -> list[str]:
        return [d.key for d in self.space]

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """The override list of one trial: base, then its sampled values."""
        return [*self.base, *(f"--{k}={override_value(v)}" for k, v in params.items() if k in self.keys())]

    def trial_config(self, params: dict[str, Any]) -> Config:
        return load_config(self.config or None, self.trial_overrides(params))

    def base_config(self) -> Config:
        return load_config(self.config or None, self.base)

    def reference_point(self) -> dict[str, Any] | None:
        """The flow-matching trial: weight 0, listed dimensions at their first value, ranges sampled."""
        if not self.reference:
            return None
        point = {d.key: d.args[0] for d in self.space if d.kind == "values"}
        point[SELF_EVAL_WEIGHT] = 0.0
        return point


def override_value(value: Any) -> str:
    """A Python value as the string ``load_config`` parses back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(override_value(v) for v in value)
    return str(value)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_known(given: dict[str, Any], allowed: list[str], where: str) -> None:
    for k in given:
        if k not in allowed:
            near = difflib.get_close_matches(k, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown key {k!r} in {where}{hint} (valid: {', '.join(allowed)})")


def _dimension(key: str, entry: Any) -> Dimension:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(
            f"[space] {key!r} must be a one-entry table such as {{ values = [...] }} or {{ uniform = [lo, hi] }}, "
            f"got {entry!r}")
    kind, args = next(iter(entry.items()))
    if kind not in DISTRIBUTIONS:
        near = difflib.get_close_matches(kind, DISTRIBUTIONS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"[space] {key!r}: unknown distribution {kind!r}{hint} (valid: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"[space] {key!r}: {kind} needs a non-empty list, got {args!r}")
    if kind != "values":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"[space] {key!r}: {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise ConfigError(f"[space] {key!r}: {kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"[space] {key!r}: loguniform needs low > 0, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"[space] {key!r}: randint needs integer bounds, got {args!r}")
    return Dimension(key, kind, list(args))


def load_space(path: str | Path | None, overrides: list[str] | None = None, **sweep: Any) -> SweepSpec:
    """Read a space file (None: defaults only), apply ``--key=value`` overrides to [base] and
    ``sweep`` keyword values (non-None) to [sweep], and validate everything."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"space file {p} does not exist; pass an existing .toml with --space (see tune/)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"space file {p} is not valid TOML: {e}") from e
    _check_known(data, ["sweep", "base", "space"], "the space file (top-level tables)")
    table = dict(data.get("sweep", {}))
    table.update({k: v for k, v in sweep.items() if v is not None})
    names = [f.name for f in dataclasses.fields(SweepSpec) if f.name not in ("base", "space", "source")]
    _check_known(table, names, "[sweep]")
    asha = table.pop("asha", {})
    if not isinstance(asha, dict):
        raise ConfigError(f"[sweep] asha must be a table ([sweep.asha]), got {asha!r}")
    _check_known(asha, [f.name for f in dataclasses.fields(AshaSpec)], "[sweep.asha]")
    _check_types(table, SweepSpec, "[sweep]")
    _check_types(asha, AshaSpec, "[sweep.asha]")
    spec = SweepSpec(**table, asha=AshaSpec(**asha), source=str(path or ""))
    spec.base = [f"--{k}={override_value(v)}" for k, v in _flatten(data.get("base", {})).items()]
    spec.base += list(overrides or [])
    spec.space = [_dimension(k, v) for k, v in data.get("space", {}).items()]
    _resolve_metric(spec)
    validate(spec)
    return spec


def _resolve_metric(spec: SweepSpec) -> None:
    """Fill an empty metric from the base config's eval suite and an empty mode from the metric."""
    if not spec.metric or spec.mode == "" and spec.metric in METRIC_MODES:
        try:
            base = spec.base_config()
        except ConfigError as e:
            raise ConfigError(f"[base]: {e}") from e
        spec.metric = spec.metric or ranking_metric(base.eval.resolved_suite(base.data.source))
    if not spec.mode:  # other metrics (training stats) keep the former default, max
        spec.mode = METRIC_MODES.get(spec.metric, "max")


def validate(spec: SweepSpec) -> None:
    """Every check that can fail without Ray: search kind, keys and values against Config, metric, ASHA."""
    _check_search(spec)
    _check_keys(spec)
    _check_metric(spec, spec.base_config())


def _check_types(table: dict[str, Any], cls: type, where: str) -> None:
    for f in dataclasses.fields(cls):
        if f.name not in table or f.default is dataclasses.MISSING:
            continue
        value, kind = table[f.name], type(f.default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and (kind is bool or not isinstance(value, bool)))
        if not ok:
            raise ConfigError(f"{where} {f.name} must be {kind.__name__}, got {value!r}")


def _check_search(spec: SweepSpec) -> None:
    if spec.search not in SEARCHES:
        raise ConfigError(f"[sweep] search must be one of {', '.join(SEARCHES)}, got {spec.search!r}")
    if spec.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("search = 'optuna' needs the optuna package: pip install optuna "
                          "(or pip install -e '.[optuna]'), or use search = 'grid' / 'random'")
    check_name("[sweep] name", spec.name, allow_empty=True)
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"[sweep] mode must be 'max' or 'min', got {spec.mode!r}")
    if spec.num_samples < 1 or min(spec.max_concurrent, spec.max_failures, spec.time_budget_s) < 0:
        raise ConfigError("[sweep] num_samples must be >= 1; max_concurrent, max_failures and time_budget_s >= 0")


def _check_keys(spec: SweepSpec) -> None:
    """[base] and [space] keys against the real Config, every listed value and both ends of every range."""
    if not spec.space:
        raise ConfigError("[space] is empty: give at least one key to sweep, e.g. "
                          f"\"{SELF_EVAL_WEIGHT}\" = {{ values = [0.5, 1.0] }}")
    for key, _ in parse_overrides(spec.base):
        if key in SWEEP_OWNED[1:]:
            raise ConfigError(f"[base] {key} is set per trial by the sweep; use [sweep] name / storage_path")
    try:
        spec.base_config()
    except ConfigError as e:
        raise ConfigError(f"[base]: {e}") from e
    for d in spec.space:
        if d.key.startswith(CACHE_PREFIXES):
            raise ConfigError(f"[space] {d.key!r} changes the encoded cache, which the sweep builds once for all "
                              "trials; set it in [base] instead")
        if d.key in SWEEP_OWNED or d.key.startswith("tracking."):
            raise ConfigError(f"[space] {d.key!r} cannot be swept: it is the same for every trial of a sweep")
        if spec.search == "grid" and d.kind != "values":
            raise ConfigError(f"[space] {d.key!r}: grid search needs {{ values = [...] }}; "
                              f"{d.kind} needs search = 'random' or 'optuna'")
        for value in d.args:
            try:
                load_config(spec.config or None, [*spec.base, f"--{d.key}={override_value(value)}"])
            except ConfigError as e:
                raise ConfigError(f"[space] {d.key!r} = {value!r}: {e}") from e
    if spec.reference:
        weight = next((d for d in spec.space if d.key == SELF_EVAL_WEIGHT), None)
        if weight is None:
            raise ConfigError(f"[sweep] reference = true needs {SELF_EVAL_WEIGHT!r} in [space]")
        if weight.kind == "values" and 0 in weight.args:
            raise ConfigError(f"[space] {SELF_EVAL_WEIGHT!r} already lists 0 (flow matching): "
                              "drop it or set [sweep] reference = false")


def _check_metric(spec: SweepSpec, base: Config) -> None:
    """The metric must be in every report Tune gets, and ASHA's first rung must come after real scores."""
    t = base.train
    suite = base.eval.resolved_suite(base.data.source)
    periodic = spec.metric in METRIC_MODES
    if periodic and spec.metric not in periodic_metrics(suite):
        raise ConfigError(f"metric {spec.metric!r} is not reported by the eval suite {suite!r} of [base]: use "
                          f"{' or '.join(repr(m) for m in periodic_metrics(suite))}, or change eval.suite")
    if periodic and METRIC_MODES[spec.metric] != spec.mode:
        better = "higher" if METRIC_MODES[spec.metric] == "max" else "lower"
        raise ConfigError(f"metric {spec.metric!r} is better when {better}: set [sweep] mode = "
                          f"{METRIC_MODES[spec.metric]!r} (or leave it empty)")
    if periodic and not t.eval_every:
        raise ConfigError(f"metric {spec.metric!r} needs periodic evaluation: set \"train.eval_every\" in [base]")
    if periodic:
        base.eval.require_networks(base.data.source)
    if not periodic:  # training stats come with log steps only
        if any(every % t.log_every for every in (t.checkpoint_every, t.eval_every, t.sample_every) if every):
            raise ConfigError(f"metric {spec.metric!r} is logged every train.log_every={t.log_every} steps: make "
                              "train.checkpoint_every, eval_every and sample_every multiples of it")
    if spec.asha.enabled:
        grace = grace_period(spec, base)
        if periodic and grace < t.eval_every:
            raise ConfigError(f"[sweep.asha] grace_period={grace} comes before the first evaluation "
                              f"(train.eval_every={t.eval_every}): every trial would score 0 there")
        if spec.asha.reduction_factor <= 1 or grace < 1 or grace >= max_steps(spec, base):
            raise ConfigError("[sweep.asha] needs reduction_factor > 1 and 1 <= grace_period < train.steps")


def grace_period(spec: SweepSpec, base: Config) -> int:
    return spec.asha.grace_period or base.train.eval_every or base.train.log_every


def max_steps(spec: SweepSpec, base: Config) -> int:
    """ASHA's last rung: the longest trial's step count."""
    if spec.asha.max_t:
        return spec.asha.max_t
    steps = next((d for d in spec.space if d.key == "train.steps"), None)
    return int(max(steps.args)) if steps else base.train.steps


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space for an Optuna search (flat dotted keys, so a trial's config is its list of
    overrides). Grid and random points are drawn by ``selfe.sweep.ledger.planned_points``."""
    from ray import tune

    out: dict[str, Any] = {}
    for d in spec.space:
        if d.kind == "values":
            out[d.key] = tune.choice(d.args)
        elif d.kind == "uniform":
            out[d.key] = tune.uniform(*d.args)
        elif d.kind == "loguniform":
            out[d.key] = tune.loguniform(*d.args)
        else:
            out[d.key] = tune.randint(d.args[0], d.args[1] + 1)  # Tune's upper bound is exclusive
    return out


def spec_to_json(spec: SweepSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), indent=2)


def spec_from_json(text: str) -> SweepSpec:
    """The inverse of ``spec_to_json`` (a restored sweep continues with the spec it started with)."""
    data = json.loads(text)
    return SweepSpec(**{**data, "asha": AshaSpec(**data["asha"]), "space": [Dimension(**d) for d in data["space"]]})
