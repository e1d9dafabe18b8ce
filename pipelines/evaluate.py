"""GenEval-lite evaluation of a trained selfe model at several step counts.

    python pipelines/evaluate.py --model models:/selfe@champion --steps 1 2 4 8 50 [--log-to-mlflow]

Writes one JSONL record per image (``correct``, ``reason``) per step count and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfe.cli import OneLineParser, finite_float, int_in, load_model_or_fail, model_ref  # noqa: E402
from selfe.sampling import MAX_STEPS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=model_ref)
    ap.add_argument("--steps", type=int_in(1, MAX_STEPS), nargs="+", default=[1, 2, 4, 8, 50])
    ap.add_argument("--guidance", type=finite_float, default=None)
    ap.add_argument("--landing", choices=["auto", "next", "current", "midpoint"], default=None,
                    help="landing time policy; default: the model's config (auto: follows the training method)")
    ap.add_argument("--eta", type=finite_float, default=None)
    ap.add_argument("--prompt-set", default="v1")
    ap.add_argument("--max-per-task", type=int_in(0), default=0, help="first N prompts per task and split (0: all)")
    ap.add_argument("--seed", type=int_in(0), default=1234)
    ap.add_argument("--out", default="outputs/eval")
    ap.add_argument("--log-to-mlflow", action="store_true", help="log the table and metrics to a new MLflow run")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)

    import mlflow

    from selfe.eval.runner import evaluate_steps, select_prompts, steps_table

    gen = load_model_or_fail(args.model, args.tracking_uri)
    if gen is None:
        return 2
    records = select_prompts(args.prompt_set, args.max_per_task)
    results = evaluate_steps(gen, records, args.steps, guidance=args.guidance, seed=args.seed, out_dir=args.out,
                             landing=args.landing, eta=args.eta)
    table = steps_table(results)
    out = Path(args.out)
    (out / "geneval_lite.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    print(table)
    if args.log_to_mlflow:
        with mlflow.start_run(run_name=f"eval {args.model}") as run:
            mlflow.set_tag("selfe.evaluated_model", args.model)
            for steps, s in results.items():
                mlflow.log_metric(f"geneval_{steps}steps_overall", s["overall"])
                for task, acc in s["per_task"].items():
                    mlflow.log_metric(f"geneval_{steps}steps_{task}", acc)
            mlflow.log_artifacts(str(out), "eval")
            print(f"logged to MLflow run {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
