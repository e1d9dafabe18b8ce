"""Ray Tune sweeps: space validation (fast), and one tiny 3-trial sweep (slow) that checks ASHA stops a
bad trial and hands its CPUs to the next one, the MLflow parent/child runs and the sweep-best alias."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from selfe.config import load_config
from selfe.configtools import ConfigError
from selfe.sweep.ledger import planned_points, planned_total
from selfe.sweep.space import load_space, param_space
from tests.conftest import job_sandbox

REPO = Path(__file__).resolve().parents[1]

TINY_BASE = """
"data.num_samples" = 48
"model.double_blocks" = 1
"model.single_blocks" = 1
"model.width" = 64
"model.head_dim" = 16
"text.max_tokens" = 16
"train.steps" = 6
"train.batch_size" = 8
"train.log_every" = 1
"train.checkpoint_every" = 6
"train.eval_every" = 3
"train.cpus_per_worker" = 0.5
"train.compile" = false
"optim.warmup_steps" = 2
"eval.periodic_per_task" = 1
"eval.periodic_steps" = [1]
"eval.steps" = [1]
"eval.untrained_reference" = false
"""


FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "AKIASELFEFAKEKEY0042", "AWS_SECRET_ACCESS_KEY": "selfe/fake+secret/Zq93hX7kLmN0pQ",
             "AWS_SESSION_TOKEN": "selfe-fake-session-token-8d1e"}


def write_space(path: Path, sweep: str, space: str, base: str = TINY_BASE) -> Path:
    path.write_text(f"[sweep]\n{sweep}\n[base]\n{base}\n[space]\n{space}\n")
    return path


# ------------------------------------------------------------------ the space file, without Ray


def test_default_space_is_valid_and_has_a_flow_matching_reference():
    spec = load_space(REPO / "tune" / "default.toml")
    assert spec.search == "grid" and spec.metric == "geneval_fewstep" and spec.reference
    assert "objective.self_eval_weight" in spec.keys()
    assert spec.base_config().train.steps >= 150  # long enough for the few-step score to leave 0 and rank trials
    assert planned_total(spec) == 2 + 1  # two weights and the reference trial
    assert [p["objective.self_eval_weight"] for p in planned_points(spec)] == [0.0, 1.0, 2.0]
    assert spec.reference_point()["objective.self_eval_weight"] == 0.0
    assert set(param_space(spec)) == set(spec.keys())
    cluster = load_space(REPO / "tune" / "self_eval_schedule.toml")  # the random-search example is valid too
    assert cluster.search == "random" and "sampler.guidance" in cluster.keys()


@pytest.mark.parametrize("sweep, space, message", [
    ('search = "bayes"', '"optim.lr" = { values = [1e-3] }', "search must be one of grid, random, optuna"),
    ('serch = "grid"', '"optim.lr" = { values = [1e-3] }', "did you mean 'search'"),
    ("", '"optim.lr" = { normal = [0, 1] }', "unknown distribution 'normal'"),
    ("", '"objective.self_eval_wieght" = { values = [1.0] }', "self_eval_weight"),
    ("", '"optim.lr" = { uniform = [1e-4, 1e-3] }', "grid search needs { values = [...] }"),
    ("", '"objective.p_s_equals_t" = { values = [0.5, 1.5] }', "p_s_equals_t must be in [0, 1]"),
    ("", '"text.max_tokens" = { values = [8, 16] }', "changes the encoded cache"),
    ("reference = true", '"optim.lr" = { values = [1e-3] }', "reference = true needs"),
    ('metric = "loss"\n[sweep.asha]\ngrace_period = 9', '"optim.lr" = { values = [1e-3] }',
     "grace_period < train.steps"),
    ('num_samples = "3"', '"optim.lr" = { values = [1e-3] }', "num_samples must be int"),
])
def test_space_errors_name_the_problem(tmp_path, sweep, space, message):
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path / "s.toml", sweep, space))
    assert message in str(err.value)


def test_fewstep_metric_needs_periodic_eval(tmp_path):
    base = TINY_BASE.replace('"train.eval_every" = 3', '"train.eval_every" = 0')
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_space(write_space(tmp_path / "s.toml", "", '"optim.lr" = { values = [1e-3] }', base))


def test_optuna_is_optional_with_a_clear_message(tmp_path):
    path = write_space(tmp_path / "s.toml", 'search = "optuna"', '"optim.lr" = { loguniform = [1e-4, 1e-2] }')
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install optuna"):
            load_space(path)
    else:
        assert load_space(path).search == "optuna"


def test_concurrency_leaves_a_cpu_for_ray_data():
    from selfe.sweep.resources import max_concurrent_trials

    cfg = load_config(overrides=["--train.cpus_per_worker=0.5"])
    assert max_concurrent_trials(cfg, {"CPU": 2.0}) == 1  # 2 trials (1.2 CPUs) would starve the read tasks
    assert max_concurrent_trials(cfg, {"CPU": 16.0}) == 25
    assert max_concurrent_trials(cfg, {"CPU": 16.0}, cap=3) == 3
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        max_concurrent_trials(load_config(), {"CPU": 2.0})  # a 1-CPU worker + 0.1 driver + 1 for reads > 2
    gpu = load_config(overrides=["--train.use_gpu=true", "--train.num_workers=2"])
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    pinned = load_config(overrides=["--train.cpus_per_worker=0.5", "--train.worker_resources.trainer=1"])
    assert max_concurrent_trials(pinned, {"CPU": 16.0, "trainer": 2.0}) == 2  # custom resources count too


# ------------------------------------------------------------------ one real sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three 6-step trials one at a time: lr 3e-3, 1e-9 (learns nothing), 3e-3. ASHA's only rung is
    step 4, ranked by the training loss (the tiny model scores 0 on GenEval-lite after 6 steps, so the
    few-step score cannot tell the trials apart here): the 1e-9 trial must stop there."""
    from selfe.sweep.runner import run_sweep

    root = tmp_path_factory.mktemp("tune")
    with job_sandbox(root), pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_KEYS.items():  # in the driver's environment, as on a laptop with S3 access
            mp.setenv(name, value)
        sweep_table = (f'name = "asha"\nmetric = "loss"\nmode = "min"\nmax_concurrent = 1\ntime_budget_s = 900\n'
                       f'storage_path = "{root / "sweeps"}"\n[sweep.asha]\ngrace_period = 4\nreduction_factor = 2')
        base = TINY_BASE + f'"data.cache_root" = "{root / "cache"}"\n'
        spec = load_space(write_space(root / "space.toml", sweep_table, '"optim.lr" = { values = [3e-3, 1e-9, 3e-3] }',
                                      base))
        yield spec, run_sweep(spec, out_root=str(root / "outputs")), root


@pytest.mark.slow
def test_sweep_runs_its_trials_and_summarises(sweep):
    spec, res, root = sweep
    assert [r.params["optim.lr"] for r in res.rows] == [3e-3, 1e-9, 3e-3]
    done = [r for r in res.rows if r.outcome == "completed"]
    assert len(done) == 2 and all(r.step == 6 and Path(r.checkpoint_path).is_dir() for r in done)
    assert res.best is res.rows[0] and res.best.params["optim.lr"] == 3e-3
    summary = (Path(res.out_dir) / "summary.md").read_text()
    assert "**best**" in summary and "stopped early" in summary
    assert Path(res.plot_path).stat().st_size > 1000
    train_runs = {p.name for p in (root / "sweeps" / "asha" / "train_runs").iterdir()}
    assert train_runs == {f"asha-{r.trial_id}" for r in res.rows}  # every trial's checkpoints inside the sweep


@pytest.mark.slow
def test_no_credential_reaches_rays_files_or_the_sweep_folder(sweep):
    """With AWS keys in the driver's environment, nothing Ray wrote (its session folder: logs, runtime
    environments) nor anything in the sweep folder holds them. Tune alone would put them in every
    trial's runtime environment, which Ray's runtime-env agent logs."""
    _, _, root = sweep
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for folder in (session, root / "sweeps") for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "runtime_env_agent.log" for p in files) and len(files) > 20
    secrets = [v.encode() for v in FAKE_KEYS.values()]
    leaks = [str(p) for p in files if any(s in p.read_bytes() for s in secrets)]
    assert leaks == []


@pytest.mark.slow
def test_asha_stops_the_bad_trial_and_its_cpus_go_to_the_next(sweep):
    from selfe.sweep.resources import live_placement_groups

    _, res, _ = sweep
    first, bad, later = res.rows
    assert bad.params["optim.lr"] == 1e-9 and bad.outcome == "stopped early" and bad.step == 4
    assert later.outcome == "completed" and later.step == 6  # ran after the bad trial, on its CPUs
    deadline = time.time() + 30
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < 2.0 - 1e-6:
        time.sleep(1)
    assert live_placement_groups() == set()  # the stopped trial's group was given back, not just left idle
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)


@pytest.mark.slow
def test_mlflow_parent_child_runs_and_sweep_best_alias(sweep):
    spec, res, _ = sweep
    client = MlflowClient()
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags["selfe.sweep_role"] == "parent" and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 3
    by_trial = {c.data.tags["selfe.sweep_trial"]: c for c in children}
    assert set(by_trial) == {r.trial_id for r in res.rows}
    statuses = {by_trial[r.trial_id].info.status for r in res.rows if r.outcome == "stopped early"}
    assert statuses == {"KILLED"}
    best_child = by_trial[res.best.trial_id]
    assert best_child.info.status == "FINISHED" and best_child.data.params["optim.lr"] == "0.003"
    assert [m.step for m in client.get_metric_history(best_child.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert "geneval_fewstep" in best_child.data.metrics  # the periodic few-step score, logged by rank 0
    version = client.get_model_version_by_alias("selfe", "sweep-best")
    assert int(version.version) == res.model_version and version.run_id == best_child.info.run_id
    artifacts = {a.path for a in client.list_artifacts(res.parent_run_id, "sweep")}
    assert {"sweep/summary.md", "sweep/sweep.png", "sweep/spec.json"} <= artifacts
    assert parent.data.metrics["trials_stopped_early"] == 1


class RunsCode:
    """A pickle that runs a command when loaded: what a writer of the sweep folder could plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_resumed_sweep_runs_no_pickle_from_its_folder_and_goes_on(sweep):
    """Every pickle Tune left in the sweep folder is replaced by one that runs a command, and the
    second trial is marked as cut off mid-run (a driver that died): the resume reruns that trial
    only, ASHA (rebuilt from the ledger) stops it at the same rung, and the command never runs.
    Stock ``Tuner.restore`` on the same folder does run it (the planted pickle is live)."""
    import json
    import pickle

    from ray import tune

    from selfe.sweep.ledger import LEDGER_FILE
    from selfe.sweep.runner import run_sweep

    spec, first, root = sweep
    folder = root / "sweeps" / "asha"
    marker = root / "pwned"
    planted = [p for p in folder.rglob("*.pkl")]
    assert any(p.name == "tuner.pkl" for p in planted) and any(p.name == "params.pkl" for p in planted)
    for path in planted:
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    ledger = json.loads((folder / LEDGER_FILE).read_text())
    assert [t["status"] for t in ledger["trials"]] == ["completed", "stopped", "completed"]
    ledger["trials"][1].update(status="running", step=3, history=[])
    (folder / LEDGER_FILE).write_text(json.dumps(ledger))

    again = run_sweep(spec, resume=True, out_root=str(root / "outputs"))
    assert not marker.exists()
    assert again.resumed and [r.trial_id for r in again.rows] == ["t000", "t001", "t002"]
    assert [r.outcome for r in again.rows] == [r.outcome for r in first.rows]  # t001 stopped again at step 4
    assert again.rows[1].step == 4 and again.best.trial_id == first.best.trial_id
    assert again.parent_run_id == first.parent_run_id and again.model_version == first.model_version
    after = json.loads((folder / LEDGER_FILE).read_text())
    assert after["attempts"] == 2 and [t["attempt"] for t in after["trials"]] == [0, 1, 0]
    assert (folder / "attempt-1" / "t001").is_dir() and not (folder / "attempt-1" / "t000").exists()

    try:  # the control: Ray's own restore unpickles tuner.pkl, and the command runs
        tune.Tuner.restore(str(folder / "attempt-0"), trainable=lambda config: None)
    except Exception:
        pass
    assert marker.exists()
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sweep(load_space(root / "space.toml", name="never-ran"), resume=True)


@pytest.mark.slow
def test_a_stopped_trials_group_is_given_back_after_the_grace_period(sweep):
    from types import SimpleNamespace

    from ray.util import placement_group, remove_placement_group

    from selfe.sweep.resources import ReleaseStoppedTrialGroups, live_placement_groups
    from selfe.train.handoff import PLACEMENT_GROUP_KEY

    stopped, finished = placement_group([{"CPU": 0.5}]), placement_group([{"CPU": 0.5}])
    ray.get([stopped.ready(), finished.ready()])
    remove_placement_group(finished)  # as a controller does when its run ends by itself
    callback = ReleaseStoppedTrialGroups(grace_s=1.0)
    for trial_id, group in (("a", stopped), ("b", finished)):
        trial = SimpleNamespace(trial_id=trial_id)
        callback.on_trial_result(0, [], trial, {"step": 4, PLACEMENT_GROUP_KEY: group.id.hex()})
        callback.on_trial_complete(0, [], trial)
    assert callback.release() == 0 and stopped.id.hex() in live_placement_groups()  # its controller may live on
    time.sleep(1.1)
    assert callback.release() == 1 and stopped.id.hex() not in live_placement_groups()
    assert callback.release() == 0  # each group once
