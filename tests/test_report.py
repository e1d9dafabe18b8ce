"""The reproduction report: claims checked against the numbers, tables, plots, hand-written text kept."""

from __future__ import annotations

from pathlib import Path

from selfe.eval.report import END, START, claims, write_report

LABELS = {"self_e": ("Self-E", []), "flow_matching": ("flow matching", []), "no_renorm": ("no renorm", []),
          "fake_from_start": ("fake from start", [])}


def summary(overall: float, nfe: int = 2) -> dict:
    tasks = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    return {"overall": overall, "per_task": {t: overall for t in tasks}, "heldout": overall / 2, "nfe": nfe}


def study(self_e: list[float], fm: list[float], ckpt: dict[int, tuple[float, float]] | None = None) -> dict:
    evals = {}
    for n, a, b in zip([1, 2, 4, 8, 50], self_e, fm):
        evals[f"self_e|final|{n}"] = summary(a, 2 * n)
        evals[f"flow_matching|final|{n}"] = summary(b, 2 * n)
        evals[f"no_renorm|final|{n}"] = summary(a - 0.05)
        evals[f"fake_from_start|final|{n}"] = summary(a + 0.01)
    for step, (a, b) in (ckpt or {}).items():
        evals[f"self_e|ckpt{step}|2"] = summary(a)
        evals[f"flow_matching|ckpt{step}|2"] = summary(b)
    evals["self_e|landing-midpoint|1"] = summary(0.3)
    evals["self_e|w1-eta0|50"] = summary(0.2, 50)
    runs = {v: {"final_step": 800, "train_s": 600.0, "job_s": 700.0, "mlflow_run_id": "abc", "model_version": 1}
            for v in LABELS}
    return {"budget": "cpu", "evals": evals, "runs": runs, "config": {"self_e": {"params": 2.4e6, "resolution": 32,
            "steps": 800, "batch_size": 32, "prompts": 180}}, "hardware": {"cpu": "x86_64", "cores": 2}}


def test_claims_follow_the_numbers():
    good = claims({tuple(k.split("|")): v for k, v in
                   study([0.4, 0.5, 0.55, 0.6, 0.6], [0.1, 0.2, 0.5, 0.6, 0.6], {200: (0.2, 0.1)})["evals"].items()})
    text = "\n".join(good)
    assert "ahead of flow matching at 1–2 steps: **yes**" in text
    assert "at least level at 8–50 steps: **yes**" in text
    assert "monotonic in steps: **yes**" in text
    assert "every checkpoint: **yes**" in text
    assert "from the start hurts: **no**" in text  # the fixture's fake variant scores 0.01 higher
    assert "renorm helps at ≥ 4 steps: **yes**" in text

    bad = "\n".join(claims({tuple(k.split("|")): v for k, v in
                            study([0.1, 0.3, 0.2, 0.2, 0.1], [0.2, 0.2, 0.3, 0.3, 0.3], {200: (0.0, 0.1)})["evals"].items()}))
    assert "1–2 steps: **no** (1 step: 0.100 vs 0.200" in bad
    assert "8–50 steps: **no**" in bad and "monotonic in steps: **no**" in bad and "every checkpoint: **no**" in bad


def test_report_regenerates_between_markers_and_keeps_the_rest(tmp_path: Path):
    path = tmp_path / "results.md"
    path.write_text(f"# Results\n\nHand-written analysis.\n\n{START}\nold numbers\n{END}\n\n## Notes\nkept\n")
    write_report(study([0.4, 0.5, 0.55, 0.6, 0.6], [0.1, 0.2, 0.5, 0.6, 0.6]), path, LABELS)
    text = path.read_text()
    assert "Hand-written analysis." in text and "## Notes\nkept" in text and "old numbers" not in text
    assert text.count(START) == 1 and text.count(END) == 1
    assert "| 1 | 2 / 2 | 0.400 | 0.100 | +0.300 |" in text  # the headline row: steps, NFE, Self-E, FM, difference
    assert "| self_e | midpoint | 0.300 |" in text
    for png in ("quality_vs_steps.png", "quality_vs_training.png"):
        data = (tmp_path / "results" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
