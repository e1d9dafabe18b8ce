"""benchmarks/gpu_study.py: its GPU profile's model, and the whole script in its CPU smoke profile."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_study.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_study"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gpu_profile_trains_the_71m_reproduction_model_on_64x64_shapes():
    from selfe.core.model import build_model

    study = _load_script()
    for method in study.METHODS:
        cfg = study.study_config(study.PROFILES["gpu"], method, 1234, [])
        assert cfg.objective.method == method and cfg.train.steps == 1234
        assert cfg.data.resolution == 64 and cfg.model.num_tokens(64, 64) == 256 and cfg.train.batch_size == 256
    params = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert 65e6 < params < 75e6, params


@pytest.mark.slow
def test_cpu_profile_trains_both_methods_for_equal_time_and_scores_every_step_count(tmp_path):
    study = _load_script()
    budget = 6.0
    report = study.main(["--profile", "cpu", "--device", "cpu", "--train-s", str(budget), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_study.json").read_text()) == report
    assert set(report["methods"]) == {"self_e", "flow_matching"}
    eta = {"self_e": lambda s: 0.5, "flow_matching": lambda s: 0.0 if s <= 2 else 1.0}  # per-step defaults
    for method, m in report["methods"].items():
        train = m["train"]
        # Equal wall time: each method's training took about the budget (the planned steps, or the deadline).
        assert 0.5 * budget < train["train_s"] < 1.3 * budget, train
        assert 10 <= train["steps"] <= train["planned_steps"]
        assert train["warmup_steps"] == max(train["planned_steps"] // 20, 5)  # 5% of the run, not the recipe's 1,000
        assert sorted(map(int, m["scores"])) == [1, 2, 4, 8, 50]
        for steps, s in m["scores"].items():
            assert 0.0 <= s["overall"] <= 1.0 and s["se"] >= 0 and s["prompts"] == 12
            assert s["eta"] == eta[method](int(steps))
        # rows: 5 step counts of 32 px + 2 px padding; columns: 4 prompts; drawn at 2x
        grid = np.asarray(Image.open(tmp_path / f"grid_{method}.png"))
        assert grid.shape == (2 * (5 * 34 + 2), 2 * (4 * 34 + 2), 3)
    # Self-E steps cost more (the self-evaluation forward): fewer fit in the same time.
    assert report["methods"]["self_e"]["train"]["steps"] < report["methods"]["flow_matching"]["train"]["steps"]
    md = (tmp_path / "gpu_study.md").read_text()
    assert "| self_e |" in md and "| flow_matching |" in md and report["device"] in md
