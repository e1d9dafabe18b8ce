"""GenEval-lite evaluation of a trained selfe model at several step counts.

    python pipelines/evaluate.py --model models:/selfe@champion --steps 1 2 4 8 50 [--log-to-mlflow]

Writes one JSONL record per image (``correct``, ``reason``) per step count and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfe.cli import OneLineParser, add_device_argument, finite_float, int_in, load_model_or_fail, model_ref
from selfe.core.sampling import MAX_STEPS


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
    add_device_argument(ap)
    args = ap.parse_args(argv)

    from selfe.eval.metrics import geneval_metrics
    from selfe.eval.runner import evaluate_steps, select_prompts, steps_table

    gen = load_model_or_fail(args.model, args.tracking_uri, args.device)
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
        from selfe.tracking import log_evaluation

        run_id = log_evaluation(f"eval {args.model}", {"selfe.evaluated_model": args.model},
                                geneval_metrics(results), out)
        print(f"logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
