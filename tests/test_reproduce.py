"""The study's plan: run order, and checkpoints kept with the study's own state."""

from __future__ import annotations

from pathlib import Path

from pipelines.reproduce import run_key, sampler_diagnostics, variant_config, wall_key


def test_checkpoints_live_under_the_study_folder_so_another_study_never_resumes_them(tmp_path: Path) -> None:
    smoke = variant_config("cpu", "self_e", ["--train.steps=30"], 0, tmp_path / "smoke")
    study = variant_config("cpu", "self_e", [], 0, tmp_path / "study")
    assert smoke.train.run_name == study.train.run_name == "repro-cpu-self-e-s0"
    assert Path(smoke.train.storage_path) == tmp_path / "smoke" / "cpu" / "ray_results"
    assert Path(study.train.storage_path) == tmp_path / "study" / "cpu" / "ray_results"
    assert study.train.steps == 12000 and smoke.train.steps == 30  # the command line's overrides win
    assert run_key("self_e", 2) == "self_e@s2"


def test_max_runs_below_one_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    from pipelines.reproduce import main

    assert main(["--max-runs", "0", "--out", str(tmp_path), "--report", str(tmp_path / "r.md")]) == 2
    assert "--max-runs must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "cpu").exists()


def test_a_study_resumed_in_another_run_order_keeps_one_wall_time_total() -> None:
    assert wall_key(["self_e", "flow_matching", "small_gap", "no_renorm", "fake_from_start"]) == \
        "self_e,flow_matching,no_renorm,fake_from_start,small_gap"
    assert wall_key(["flow_matching", "self_e"]) == "self_e,flow_matching"  # a subset is its own study


def test_sampler_diagnostics_sit_beside_the_configs_own_sampler(tmp_path: Path) -> None:
    cfg = variant_config("cpu", "self_e", [], 0, tmp_path)
    # The CPU preset's guidance and the per-step eta defaults (None): the final scores.
    assert (cfg.sampler.guidance, cfg.sampler.eta) == (2.0, None)
    assert sampler_diagnostics(cfg) == [(1.0, 1.0), (3.0, 1.0), (5.0, 1.0), (2.0, 1.0), (2.0, 0.0), (5.0, 0.0)]
    # later seeds: eta = 1 (the old default, an ablation row) and DDIM at the default guidance, paired
    assert sampler_diagnostics(cfg, full_grid=False) == [(2.0, 1.0), (2.0, 0.0)]
    cfg.sampler.eta = 0.0  # a fixed eta is not scored twice
    assert sampler_diagnostics(cfg, full_grid=False) == [(2.0, 1.0)]
    cfg.sampler.guidance, cfg.sampler.eta = 5.0, 1.0  # the grid's points that are the default: not twice
    assert sampler_diagnostics(cfg) == [(1.0, 1.0), (3.0, 1.0), (5.0, 0.0)]
