"""The sweep's own state as data: every trial's parameters, outcome, reports and checkpoint, in one
JSON file beside the sweep (``selfe_ledger.json``), plus the plan of which trials a sweep runs.

A sweep is resumed from this ledger, never from Tune's experiment state: ``tuner.pkl``, the trials'
``params.pkl``, the searcher and scheduler checkpoints and the trials pickled inside
``experiment_state-*.json`` are all unpickled by ``Tuner.restore``, so anyone who can write the
sweep folder (a shared bucket) could run code on the cluster. Reading JSON runs nothing.

Trials are named ``t000``, ``t001``, ... in plan order and keep their name across resumes: the name
is the Train run's (``<sweep>-t003``, so a resumed trial continues its own DCP checkpoints) and the
MLflow child run's tag. A grid or random sweep's points are drawn here, from ``[sweep] seed``, once;
an Optuna sweep's are proposed as it goes (the reference point first).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from selfe.configtools import ConfigError
from selfe.sweep.space import SELF_EVAL_WEIGHT, Dimension, SweepSpec

LEDGER_FILE = "selfe_ledger.json"
TRIAL_KEY = "_selfe_trial"
"""The config entry that carries a trial's ledger name into Tune (read by the trainable)."""

PENDING, RUNNING, COMPLETED, STOPPED, INTERRUPTED, FAILED = (
    "pending", "running", "completed", "stopped", "interrupted", "failed")
STATUSES = (PENDING, RUNNING, COMPLETED, STOPPED, INTERRUPTED, FAILED)
FINISHED = (COMPLETED, STOPPED)
"""Outcomes a resume keeps; every other trial (never started, cut off, failed) runs again from its
last checkpoint."""


@dataclass
class TrialRecord:
    key: str
    params: dict[str, Any]
    status: str = PENDING
    step: int = 0
    """Last step the trial reported."""
    metric: float | None = None
    """The sweep metric in its last report that had one."""
    checkpoint_path: str | None = None
    history: list[list[float]] = field(default_factory=list)
    """[step, metric] of every report with the metric: what ASHA's rungs are rebuilt from on resume."""
    error: str | None = None
    attempt: int = 0
    """The driver run (0: the first) that last ran it."""


@dataclass
class Ledger:
    trials: dict[str, TrialRecord] = field(default_factory=dict)
    attempts: int = 0
    """Driver runs started so far."""

    def add(self, params: dict[str, Any]) -> TrialRecord:
        record = TrialRecord(trial_name(len(self.trials)), dict(params))
        self.trials[record.key] = record
        return record

    def resumable(self) -> list[TrialRecord]:
        return [r for r in self.trials.values() if r.status not in FINISHED]

    def finished(self) -> list[TrialRecord]:
        return [r for r in self.trials.values() if r.status in FINISHED]

    def to_json(self) -> str:
        return json.dumps({"attempts": self.attempts, "trials": [asdict(r) for r in self.trials.values()]}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = LEDGER_FILE) -> Ledger:
        """Parse and check every field's type: a damaged or hand-edited ledger is refused with its
        location, never half-read."""
        try:
            data = json.loads(text)
            attempts = data["attempts"]
            rows = data["trials"]
            if not isinstance(attempts, int) or not isinstance(rows, list):
                raise ValueError("attempts must be an integer and trials a list")
            ledger = cls(attempts=attempts)
            names = {f.name for f in fields(TrialRecord)}
            for row in rows:
                if not isinstance(row, dict) or set(row) - names or not {"key", "params"} <= set(row):
                    raise ValueError(f"unexpected trial entry {str(row)[:120]!r}")
                record = TrialRecord(**row)
                _check_record(record)
                ledger.trials[record.key] = record
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"sweep ledger {where} is damaged ({e}); restore it from a backup, or start the "
                              "sweep under a new name") from None
        return ledger


def _check_record(r: TrialRecord) -> None:
    number = (int, float)
    ok = (isinstance(r.key, str) and isinstance(r.params, dict) and r.status in STATUSES
          and isinstance(r.step, int) and (r.metric is None or isinstance(r.metric, number))
          and (r.checkpoint_path is None or isinstance(r.checkpoint_path, str))
          and (r.error is None or isinstance(r.error, str)) and isinstance(r.attempt, int)
          and all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, number) for x in h) for h in r.history)
          and all(isinstance(v, (str, int, float, bool)) for v in r.params.values()))
    if not ok:
        raise ValueError(f"trial {r.key!r} has a field of the wrong type")


def trial_name(index: int) -> str:
    return f"t{index:03d}"


def planned_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial's parameters, in order: the reference point (when asked for), then the grid (its
    last key varying fastest, repeated ``num_samples`` times) or ``num_samples`` random draws. Ranges
    are drawn from ``random.Random(spec.seed)``, so the plan is the same on every run of the spec.
    Optuna proposes its points as it goes: only the reference point is planned."""
    rng = random.Random(spec.seed)
    points = []
    if spec.reference:
        point = {d.key: d.args[0] if d.kind == "values" else _draw(d, rng) for d in spec.space}
        points.append({**point, SELF_EVAL_WEIGHT: 0.0})
    if spec.search == "grid":
        listed = [d for d in spec.space if d.kind == "values"]
        for _ in range(spec.num_samples):
            for combo in itertools.product(*(d.args for d in listed)):
                chosen = dict(zip((d.key for d in listed), combo))
                points.append({d.key: chosen[d.key] if d.key in chosen else _draw(d, rng) for d in spec.space})
    elif spec.search == "random":
        points += [{d.key: _draw(d, rng) for d in spec.space} for _ in range(spec.num_samples)]
    return points


def planned_total(spec: SweepSpec) -> int:
    """How many trials the whole sweep runs."""
    return spec.num_samples + bool(spec.reference) if spec.search == "optuna" else len(planned_points(spec))


def _draw(d: Dimension, rng: random.Random) -> Any:
    low, high = d.args[0], d.args[-1]
    if d.kind == "values":
        return rng.choice(d.args)
    if d.kind == "uniform":
        return rng.uniform(low, high)
    if d.kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randint(low, high)  # randint: both ends included, as the space file says


def start_attempt(spec: SweepSpec, ledger: Ledger) -> tuple[list[TrialRecord], int]:
    """Open the next driver run of the sweep: (trials to run from the ledger, in order, and how many
    new ones the searcher still proposes). The first run plans every point; a resume reruns what did
    not finish, from its last checkpoint, and plans nothing twice."""
    if not ledger.trials:
        for point in planned_points(spec):
            ledger.add(point)
    ledger.attempts += 1
    todo = ledger.resumable()
    for record in todo:
        record.status, record.error = PENDING, None
    return todo, max(0, planned_total(spec) - len(ledger.trials))
