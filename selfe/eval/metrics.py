"""The names of the evaluation metrics, in one place: training, sweeps, evaluation and the
reproduction study log under these, and Tune ranks trials by ``ranking_metric(suite)``. No Ray, no MLflow.

Two suites (``eval.suite``, named with the config in ``selfe.config.evaluation``): ``geneval_lite`` scores the procedurally rendered shapes world against
its prompt specs; ``clip_fid`` scores a held-out slice of the user's own data (``selfe.eval.heldout``)
with CLIP score and FID. ``auto`` picks GenEval-lite for the shapes source and CLIP/FID otherwise.
"""

from __future__ import annotations

FEWSTEP_METRIC = "geneval_fewstep"
"""Mean GenEval-lite overall over ``eval.periodic_steps`` (default 1, 2, 4), reported during training."""
CLIP_FEWSTEP_METRIC = "clip_fewstep"
"""Mean CLIP score over ``eval.periodic_steps`` on ``eval.periodic_images`` held-out captions."""
FID_FEWSTEP_METRIC = "fid_fewstep"
"""Mean FID over ``eval.periodic_steps`` against as many decoded held-out images (small-sample FID:
biased upwards, comparable between trials of equal ``eval.periodic_images`` only)."""

METRIC_MODES = {FEWSTEP_METRIC: "max", CLIP_FEWSTEP_METRIC: "max", FID_FEWSTEP_METRIC: "min"}
"""Whether more (max) or less (min) is better, for every periodic metric."""
UNSCORED = {"max": 0.0, "min": float("inf")}
"""The value a periodic metric carries in reports before its first evaluation: the worst there is."""


def periodic_metrics(suite: str) -> tuple[str, ...]:
    """The metrics the in-training evaluation of ``suite`` reports (the first is Tune's ranking metric)."""
    return (FEWSTEP_METRIC,) if suite == "geneval_lite" else (FID_FEWSTEP_METRIC, CLIP_FEWSTEP_METRIC)


def ranking_metric(suite: str) -> str:
    """The periodic metric Tune/ASHA ranks trials by: GenEval-lite few-step score, or few-step FID."""
    return periodic_metrics(suite)[0]


def overall_metric(steps: int | str, prefix: str = "") -> str:
    """``geneval_<steps>steps_overall`` (``prefix`` names a variant in multi-model studies)."""
    return f"{prefix}geneval_{steps}steps_overall"


def _step_key(steps: int | str) -> int | str:
    return "untrained_4" if steps == "untrained@4" else steps


def geneval_metrics(results: dict) -> dict[str, float]:
    """``evaluate_steps`` results {steps: summary} -> flat metrics: overall, NFE, each task and the
    held-out split per step count. The untrained reference ``"untrained@4"`` logs as ``untrained_4``."""
    metrics: dict[str, float] = {}
    for steps, s in results.items():
        steps = _step_key(steps)
        metrics[overall_metric(steps)] = s["overall"]
        if "nfe" in s:
            metrics[f"nfe_{steps}steps"] = s["nfe"]
        metrics.update({f"geneval_{steps}steps_{task}": acc for task, acc in s["per_task"].items()})
        if s.get("heldout") is not None:
            metrics[f"geneval_{steps}steps_heldout"] = s["heldout"]
    return metrics


def realdata_metrics(results: dict) -> dict[str, float]:
    """``evaluate_realdata_steps`` results {steps: {"clip_score", "fid", "nfe"}} -> ``clip_<steps>steps``,
    ``fid_<steps>steps``, ``nfe_<steps>steps`` (the untrained reference as ``..._untrained_4steps``)."""
    metrics: dict[str, float] = {}
    for steps, s in results.items():
        steps = _step_key(steps)
        metrics[f"clip_{steps}steps"] = s["clip_score"]
        metrics[f"fid_{steps}steps"] = s["fid"]
        if "nfe" in s:
            metrics[f"nfe_{steps}steps"] = s["nfe"]
    return metrics


def suite_metrics(suite: str, results: dict) -> dict[str, float]:
    """The flat metrics of one suite's results."""
    return geneval_metrics(results) if suite == "geneval_lite" else realdata_metrics(results)
