"""The sweep ledger without a cluster: the plan of trials, what a resume reruns, a damaged ledger
refused, the searcher that hands Tune the ledger's trials and ASHA rebuilt from earlier reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfe.configtools import ConfigError
from selfe.sweep.ledger import (
    COMPLETED, FAILED, INTERRUPTED, PENDING, RUNNING, STOPPED, TRIAL_KEY, Ledger, planned_points, planned_total,
    start_attempt,
)
from selfe.sweep.space import load_space
from tests.test_tune import write_space


def spec_of(tmp_path: Path, sweep: str, space: str):
    return load_space(write_space(tmp_path / "s.toml", sweep, space))


def test_a_grid_is_planned_in_order_with_the_reference_first_and_repeats(tmp_path):
    spec = spec_of(tmp_path, "reference = true\nnum_samples = 2",
                   '"objective.self_eval_weight" = { values = [1.0, 2.0] }\n"optim.lr" = { values = [1e-3, 3e-3] }')
    points = planned_points(spec)
    assert points[0] == {"objective.self_eval_weight": 0.0, "optim.lr": 1e-3}
    grid = [(p["objective.self_eval_weight"], p["optim.lr"]) for p in points[1:]]
    assert grid == [(1.0, 1e-3), (1.0, 3e-3), (2.0, 1e-3), (2.0, 3e-3)] * 2
    assert planned_total(spec) == 9


def test_random_points_are_drawn_once_from_the_seed_within_bounds(tmp_path):
    space = '"optim.lr" = { loguniform = [1e-4, 1e-2] }\n"optim.warmup_steps" = { randint = [1, 3] }'
    spec = spec_of(tmp_path, 'search = "random"\nnum_samples = 40\nseed = 7', space)
    points = planned_points(spec)
    assert points == planned_points(spec) and len(points) == 40
    assert all(1e-4 <= p["optim.lr"] <= 1e-2 for p in points)
    assert {p["optim.warmup_steps"] for p in points} == {1, 2, 3}  # both ends included
    other = spec_of(tmp_path, 'search = "random"\nnum_samples = 40\nseed = 8', space)
    assert planned_points(other) != points


def test_a_resume_reruns_what_did_not_finish_and_plans_nothing_twice(tmp_path):
    spec = spec_of(tmp_path, "", '"optim.lr" = { values = [1e-3, 2e-3, 3e-3, 4e-3, 5e-3] }')
    ledger = Ledger()
    todo, new = start_attempt(spec, ledger)
    assert [r.key for r in todo] == ["t000", "t001", "t002", "t003", "t004"] and new == 0 and ledger.attempts == 1
    for record, status in zip(ledger.trials.values(), [COMPLETED, STOPPED, INTERRUPTED, FAILED, RUNNING]):
        record.status = status
    ledger.trials["t003"].error = "boom"
    again = Ledger.from_json(ledger.to_json())
    todo, new = start_attempt(spec, again)
    assert [r.key for r in todo] == ["t002", "t003", "t004"] and new == 0 and again.attempts == 2
    assert all(r.status == PENDING and r.error is None for r in todo)
    assert [r.params["optim.lr"] for r in todo] == [3e-3, 4e-3, 5e-3]  # each keeps its own point


def test_optuna_plans_only_the_reference_and_counts_the_rest(tmp_path):
    pytest.importorskip("optuna")
    spec = spec_of(tmp_path, 'search = "optuna"\nnum_samples = 4\nreference = true',
                   '"objective.self_eval_weight" = { uniform = [0.5, 2.0] }')
    ledger = Ledger()
    todo, new = start_attempt(spec, ledger)
    assert [r.params["objective.self_eval_weight"] for r in todo] == [0.0] and new == 4


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d["trials"][0].update(status="done"), "wrong type"),
    (lambda d: d["trials"][0].update(step="3"), "wrong type"),
    (lambda d: d["trials"][0].update(params={"optim.lr": {"__reduce__": 1}}), "wrong type"),
    (lambda d: d["trials"][0].update(extra=1), "unexpected trial entry"),
    (lambda d: d.pop("attempts"), "attempts"),
])
def test_a_damaged_ledger_is_refused_with_its_location(tmp_path, edit, problem):
    spec = spec_of(tmp_path, "", '"optim.lr" = { values = [1e-3] }')
    ledger = Ledger()
    start_attempt(spec, ledger)
    data = json.loads(ledger.to_json())
    edit(data)
    with pytest.raises(ConfigError, match=problem) as err:
        Ledger.from_json(json.dumps(data), "s3://bucket/sweeps/x/selfe_ledger.json")
    assert "s3://bucket/sweeps/x/selfe_ledger.json" in str(err.value) and "new name" in str(err.value)
    with pytest.raises(ConfigError, match="damaged"):
        Ledger.from_json("\x80\x04K.", "x")  # a pickle is not JSON: refused, not loaded


def test_the_searcher_hands_out_the_ledger_trials_then_finishes():
    from ray.tune.search import Searcher

    from selfe.sweep.resume import PlannedSearcher

    spec_ledger = Ledger()
    a, b = spec_ledger.add({"optim.lr": 1e-3}), spec_ledger.add({"optim.lr": 2e-3})
    searcher = PlannedSearcher([b, a], new=0, first_index=2)
    searcher.set_search_properties("loss", "min", {})
    assert searcher.suggest("x1") == {"optim.lr": 2e-3, TRIAL_KEY: "t001"}
    assert searcher.suggest("x2") == {"optim.lr": 1e-3, TRIAL_KEY: "t000"}
    assert searcher.suggest("x3") == Searcher.FINISHED
    searcher.on_trial_complete("x1", {"loss": 0.5})  # nothing inside to tell: no error


def test_a_resumed_optuna_search_learns_from_finished_trials_and_names_new_ones_on():
    pytest.importorskip("optuna")
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from selfe.sweep.resume import PlannedSearcher

    ledger = Ledger()
    done, cut = ledger.add({"optim.lr": 1e-3}), ledger.add({"optim.lr": 5e-3})
    done.status, done.metric = COMPLETED, 0.25
    inner = OptunaSearch(seed=0)
    searcher = PlannedSearcher([cut], new=2, first_index=2, inner=inner, finished=[done])
    searcher.set_search_properties("loss", "min", {"optim.lr": tune.loguniform(1e-4, 1e-2)})
    assert [t.value for t in inner._ot_study.trials] == [0.25]  # the finished trial, told before any suggestion
    assert searcher.suggest("a") == {"optim.lr": 5e-3, TRIAL_KEY: "t001"}
    proposed = [searcher.suggest(i) for i in ("b", "c")]
    assert [p[TRIAL_KEY] for p in proposed] == ["t002", "t003"]
    assert all(1e-4 <= p["optim.lr"] <= 1e-2 for p in proposed)
    assert searcher.suggest("d") == "FINISHED"
    searcher.on_trial_complete("a", {"loss": 0.5})  # the resumed trial's score reaches Optuna as a point
    searcher.on_trial_complete("b", {"loss": 0.4})
    assert sorted(t.value for t in inner._ot_study.trials if t.value is not None) == [0.25, 0.4, 0.5]


def test_asha_rebuilt_from_earlier_reports_stops_a_trial_below_the_rung():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from selfe.sweep.resume import ReplayedASHA

    def asha(replay):
        s = ReplayedASHA(replay, time_attr="step", max_t=8, grace_period=4, reduction_factor=2,
                         stop_last_trials=False)
        s.set_search_properties("loss", "min")
        return s

    earlier = [[[2, 0.9], [4, 0.2]], [[4, 0.3]]]  # two finished trials: loss 0.2 and 0.3 at rung 4
    new = SimpleNamespace(trial_id="n1")
    replayed = asha(earlier)
    replayed.on_trial_add(None, new)
    assert replayed.on_trial_result(None, new, {"step": 4, "loss": 0.8}) == TrialScheduler.STOP
    assert replayed.stopped == {"n1"}
    fresh = asha([])  # without the earlier reports the first trial at a rung always continues
    fresh.on_trial_add(None, new)
    assert fresh.on_trial_result(None, new, {"step": 4, "loss": 0.8}) == TrialScheduler.CONTINUE
