"""benchmarks/gpu_check.py end to end in its CPU smoke profile: every section runs and reports numbers."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checker_records_errors_and_skips_once_the_budget_is_spent():
    from selfe.bench.gpucheck import Checker

    checker = Checker(budget_s=60.0, device=torch.device("cpu"))
    checker.run("fails", lambda: 1 / 0)
    checker.run("works", lambda: {"x": 1.0})
    assert checker.sections["fails"]["status"] == "error"
    assert checker.sections["fails"]["error"].startswith("ZeroDivisionError")
    assert checker.sections["works"] == {"status": "ok", "result": {"x": 1.0}, "seconds": pytest.approx(0, abs=1)}
    checker.budget_s = 0.0
    checker.run("late", lambda: {"x": 2.0})
    assert checker.sections["late"]["status"] == "skipped" and "budget" in checker.sections["late"]["note"]


@pytest.mark.slow
def test_cpu_profile_reports_every_section(tmp_path):
    gpu_check = _load_script()
    # A generous budget: this test checks the sections, the one above the budget.
    gpu_check.main(["--device", "cpu", "--profile", "cpu", "--budget-s", "600", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    failed = {k: v.get("error") or v.get("note") for k, v in sections.items() if v["status"] != "ok"}
    assert not failed, failed
    assert all(v["seconds"] >= 0 for v in sections.values()) and sections["throughput"]["seconds"] > 0
    assert report["device"]["torch"] == torch.__version__
    assert report["device"]["line"].startswith("cpu") and "CUDA" in report["device"]["line"]

    throughput = sections["throughput"]["result"]
    assert {r["method"] for r in throughput["rows"]} == {"self_e", "flow_matching"}
    assert all(r["step_s"] > 0 and r["images_per_s"] > 0 and r["model_tflops_per_s"] > 0 for r in throughput["rows"])
    assert throughput["image_tokens"] == 64 and throughput["dtype"] == "fp32"
    assert sections["method_ratio"]["result"]["self_e_over_fm"] > 0

    compiled = sections["compile"]["result"]
    assert compiled["compiled_step_s"] > 0 and compiled["eager_step_s"] > 0
    assert compiled["rows"][1]["warmup_s"] > compiled["compiled_step_s"]  # the warm-up holds the compilation

    ckpt = sections["checkpointing"]["result"]
    assert ckpt["step_s_on"] > 0 and ckpt["step_s_off"] > 0
    # Checkpointing keeps only the blocks' inputs for backward.
    assert 0 < ckpt["saved_mib_on"] < ckpt["saved_mib_off"]
    memory = sections["memory"]["result"]["rows"]
    assert {r["config"] for r in memory} == {"self_e", "flow_matching", "self_e compiled", "self_e +ckpt", "self_e fsdp",
                                             "self_e compiled fsdp", "flow_matching compiled fsdp"}
    prod = sections["production"]["result"]
    assert [(r["method"], r["compiled"], r["fsdp"]) for r in prod["rows"]] == [("self_e", True, True),
                                                                          ("flow_matching", True, True)]
    assert prod["self_e_over_fm"] == pytest.approx(prod["self_e_step_s"] / prod["flow_matching_step_s"], rel=1e-2)
    fsdp = sections["fsdp"]["result"]
    assert fsdp["rows"][1]["fsdp"] and not fsdp["rows"][0]["fsdp"] and fsdp["fsdp_step_s"] > 0
    assert not torch.distributed.is_initialized()  # the section's one-rank group is gone again

    sampling = sections["sampling"]["result"]["rows"]
    assert [r["steps"] for r in sampling] == [1, 2, 4, 8, 50]
    assert all(r["ms_per_batch"] > 0 and r["nfe"] == 2 * r["steps"] for r in sampling)  # guidance: 2 NFE/step

    train = sections["train_shapes"]["result"]
    assert train["steps"] == 30 and train["images_per_s"] > 0 and train["final_loss"] > 0
    assert [r["steps"] for r in train["rows"]] == [1, 2, 4, 8]
    assert all(0.0 <= r["overall"] <= 1.0 and r["images_per_s"] > 0 and r["prompts"] > 0 for r in train["rows"])

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert report["device"]["line"] in markdown
    assert all(f"## {name}: ok" in markdown for name in gpu_check.SECTIONS)


def test_sections_runs_a_subset_and_names_unknown_ones(tmp_path, capsys):
    gpu_check = _load_script()
    report = gpu_check.main(["--device", "cpu", "--profile", "cpu", "--sections", "method_ratio", "--out", str(tmp_path)])
    assert list(report["sections"]) == ["method_ratio"] and report["sections"]["method_ratio"]["status"] == "ok"
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--sections", "throughput,mfu", "--out", str(tmp_path)])
    assert "unknown --sections mfu" in capsys.readouterr().err
