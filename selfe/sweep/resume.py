"""The Tune side of the sweep ledger (``selfe.sweep.ledger``): a searcher that hands Tune the
ledger's trials, an ASHA scheduler that starts from the rungs earlier driver runs filled, and a
callback that writes every trial's progress back to the ledger.

Each driver run of a sweep is a fresh ``Tuner`` (``attempt-<n>/`` in the sweep folder); none restores
Tune's pickled state.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any, Callable

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from selfe.sweep.ledger import (
    COMPLETED, FAILED, INTERRUPTED, RUNNING, STOPPED, TRIAL_KEY, Ledger, TrialRecord, trial_name,
)

SAVE_EVERY_S = 10.0
"""Reports without the sweep metric reach the ledger at most this often; every other change at once."""


class PlannedSearcher(Searcher):
    """Suggests the ledger's trials (each config carries its name under ``TRIAL_KEY``), then, for an
    Optuna sweep, ``new`` points from ``inner``, named on from ``first_index``. Finished trials with a
    score are told to ``inner`` first, so a resumed Optuna search learns from them."""

    def __init__(self, todo: list[TrialRecord], new: int, first_index: int, inner: Searcher | None = None,
                 finished: list[TrialRecord] = ()) -> None:
        super().__init__()
        self._queue = [(r.key, dict(r.params)) for r in todo]
        self._new, self._next, self._inner = new, first_index, inner
        self._told = [(dict(r.params), r.metric) for r in finished if r.metric is not None]
        self._live: dict[str, tuple[dict[str, Any], bool]] = {}
        """Tune trial id -> (params, whether ``inner`` proposed them)."""

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        self._metric, self._mode = metric, mode
        if self._inner is not None:
            self._inner.set_search_properties(metric, mode, config, **spec)
            for params, value in self._told:
                self._inner.add_evaluated_point(params, value)
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._queue:
            key, params = self._queue.pop(0)
            self._live[trial_id] = (params, False)
            return {**params, TRIAL_KEY: key}
        if self._inner is None or self._new <= 0:
            return Searcher.FINISHED
        params = self._inner.suggest(trial_id)
        if params is None or params == Searcher.FINISHED:
            return params
        self._new -= 1
        key, self._next = trial_name(self._next), self._next + 1
        self._live[trial_id] = (params, True)
        return {**params, TRIAL_KEY: key}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        proposed = self._live.get(trial_id, (None, False))[1]
        if proposed and result.get(self._metric) is not None:
            self._inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        params, proposed = self._live.pop(trial_id, (None, False))
        if proposed:
            self._inner.on_trial_complete(trial_id, result, error)
        elif self._inner is not None and params is not None and not error and (result or {}).get(self._metric) is not None:
            self._inner.add_evaluated_point(params, result[self._metric])


class ReplayedASHA(ASHAScheduler):
    """ASHA that, before its first trial, replays the reports of trials that finished in earlier
    driver runs (``replay``: one [step, metric] list per trial), so a resumed sweep stops trials
    against the same rungs. ``stopped`` collects the Tune ids of the trials it stopped."""

    def __init__(self, replay: list[list[list[float]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._replay: list[list[list[float]]] | None = replay
        self.stopped: set[str] = set()

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if self._replay is not None:
            replay, self._replay = self._replay, None
            for i, history in enumerate(replay):
                earlier = SimpleNamespace(trial_id=f"earlier-{i}")
                super().on_trial_add(tune_controller, earlier)
                for step, value in history:
                    super().on_trial_result(tune_controller, earlier, {self._time_attr: step, self._metric: value})
                super().on_trial_remove(tune_controller, earlier)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self.stopped.add(trial.trial_id)
        return action


class LedgerCallback(Callback):
    """Writes each trial's status, reports and latest checkpoint to the ledger (``save`` persists it).

    A trial ends ``completed`` when it reported its last step, ``stopped`` when ASHA stopped it, else
    ``interrupted`` (the time budget, Ctrl-C): a resume runs it on. A driver that dies leaves its
    trials ``running`` in the ledger; a resume runs those on too."""

    def __init__(self, ledger: Ledger, save: Callable[[Ledger], None], metric: str, steps: Callable[[dict], int],
                 scheduler: ReplayedASHA | None) -> None:
        self.ledger, self._save, self._metric, self._steps, self._scheduler = ledger, save, metric, steps, scheduler
        self._saved_at = 0.0

    def _record(self, trial: Any) -> TrialRecord:
        key = trial.config[TRIAL_KEY]
        if key not in self.ledger.trials:  # proposed by Optuna in this run
            params = {k: v for k, v in trial.config.items() if k != TRIAL_KEY}
            self.ledger.trials[key] = TrialRecord(key, params)
        return self.ledger.trials[key]

    def _write(self, throttle: bool = False) -> None:
        if throttle and time.monotonic() - self._saved_at < SAVE_EVERY_S:
            return
        self._save(self.ledger)
        self._saved_at = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self._record(trial)
        record.status, record.attempt = RUNNING, self.ledger.attempts - 1
        self._write()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        record = self._record(trial)
        record.step = int(result.get("step", record.step))
        if result.get("checkpoint_path"):
            record.checkpoint_path = str(result["checkpoint_path"])
        value = result.get(self._metric)
        scored = isinstance(value, (int, float)) and math.isfinite(value)
        if scored:
            record.metric = float(value)
            record.history.append([record.step, record.metric])
        self._write(throttle=not (scored or result.get("checkpoint_path")))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self._record(trial)
        if record.step >= self._steps(record.params):
            record.status = COMPLETED
        elif self._scheduler is not None and trial.trial_id in self._scheduler.stopped:
            record.status = STOPPED
        else:
            record.status = INTERRUPTED
        self._write()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self._record(trial)
        record.status = FAILED
        try:
            record.error = str(trial.get_error()).strip().splitlines()[-1][:200]
        except Exception:  # the text error file may not have reached storage; the status is what matters
            record.error = "see the trial's error.txt"
        self._write()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._write()
