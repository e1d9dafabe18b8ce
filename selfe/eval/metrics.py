"""The names of the GenEval-lite metrics, in one place: training, sweeps, evaluation and the
reproduction study log under these, and Tune ranks trials by ``FEWSTEP_METRIC``. No Ray, no MLflow."""

from __future__ import annotations

FEWSTEP_METRIC = "geneval_fewstep"
"""Mean GenEval-lite overall over ``eval.periodic_steps`` (default 1, 2, 4), reported during training."""


def overall_metric(steps: int | str, prefix: str = "") -> str:
    """``geneval_<steps>steps_overall`` (``prefix`` names a variant in multi-model studies)."""
    return f"{prefix}geneval_{steps}steps_overall"


def geneval_metrics(results: dict) -> dict[str, float]:
    """``evaluate_steps`` results {steps: summary} -> flat metrics: overall, NFE, each task and the
    held-out split per step count. The untrained reference ``"untrained@4"`` logs as ``untrained_4``."""
    metrics: dict[str, float] = {}
    for steps, s in results.items():
        steps = "untrained_4" if steps == "untrained@4" else steps
        metrics[overall_metric(steps)] = s["overall"]
        if "nfe" in s:
            metrics[f"nfe_{steps}steps"] = s["nfe"]
        metrics.update({f"geneval_{steps}steps_{task}": acc for task, acc in s["per_task"].items()})
        if s.get("heldout") is not None:
            metrics[f"geneval_{steps}steps_heldout"] = s["heldout"]
    return metrics
