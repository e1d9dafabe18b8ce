"""Evaluation of a trained selfe model at several step counts, with the suite its config names.

    python pipelines/evaluate.py --model models:/selfe@champion --steps 1 2 4 8 50 [--log-to-mlflow]
    python pipelines/evaluate.py --model models:/selfe@champion --suite clip_fid \
        --clip-model s3://models/clip-vit-large-patch14 --fid-features s3://models/inception --num-images 5000

GenEval-lite (shapes world) writes one JSONL record per image (``correct``, ``reason``) per step count;
clip_fid scores the held-out rows of the model's training cache (``--cache``) with CLIP score and FID
and writes one {"caption", "clip_score"} record per image. Both write a markdown table and summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfe.cli import (
    OneLineParser, add_device_argument, fail, finite_float, int_in, load_model_or_fail, model_ref, unwritable,
)
from selfe.core.sampling import MAX_STEPS


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=model_ref)
    ap.add_argument("--steps", type=int_in(1, MAX_STEPS), nargs="+", default=[1, 2, 4, 8, 50])
    ap.add_argument("--guidance", type=finite_float, default=None)
    ap.add_argument("--landing", choices=["auto", "next", "current", "midpoint", "hybrid"], default=None,
                    help="landing time policy; default: the model's config (auto: follows the training method)")
    ap.add_argument("--eta", type=finite_float, default=None)
    ap.add_argument("--prompt-set", default="v1")
    ap.add_argument("--max-per-task", type=int_in(0), default=0, help="first N prompts per task and split (0: all)")
    ap.add_argument("--seed", type=int_in(0), default=1234)
    ap.add_argument("--out", default="outputs/eval")
    ap.add_argument("--log-to-mlflow", action="store_true", help="log the table and metrics to a new MLflow run")
    ap.add_argument("--tracking-uri", default=None)
    add_device_argument(ap)
    ap.add_argument("--suite", choices=["auto", "geneval_lite", "clip_fid"], default=None,
                    help="default: the model's eval.suite (auto: geneval_lite for the shapes world, else clip_fid)")
    ap.add_argument("--cache", default=None, help="clip_fid: the encoded cache whose held-out rows are scored; "
                    "default: the model config's cache (data.cache_root/<key>)")
    ap.add_argument("--clip-model", default=None, help="clip_fid: CLIP folder, s3:// prefix or hub id "
                    "(default: the model's eval.clip_model)")
    ap.add_argument("--fid-features", default=None, help="clip_fid: FID feature network (default: eval.fid_features)")
    ap.add_argument("--num-images", type=int_in(2), default=None, help="clip_fid: held-out rows scored "
                    "(default: eval.num_images)")
    args = ap.parse_args(argv)

    if problem := unwritable(args.out):
        return fail(problem)
    from selfe.configtools import ConfigError
    from selfe.eval.metrics import suite_metrics

    gen = load_model_or_fail(args.model, args.tracking_uri, args.device)
    if gen is None:
        return 2
    e = gen.cfg.eval
    for name in ("suite", "clip_model", "fid_features", "num_images"):
        if getattr(args, name) is not None:
            setattr(e, name, getattr(args, name))
    suite = e.resolved_suite(gen.cfg.data.source)
    out = Path(args.out)
    try:
        e.require_networks(gen.cfg.data.source)
        results, table = (_geneval if suite == "geneval_lite" else _clip_fid)(gen, args)
    except (ConfigError, ValueError, OSError, RuntimeError) as err:
        return fail(str(err).splitlines()[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{suite}.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    print(table)
    if args.log_to_mlflow:
        from selfe.tracking.runs import log_evaluation

        run_id = log_evaluation(f"eval {args.model}", {"selfe.evaluated_model": args.model},
                                suite_metrics(suite, results), out)
        print(f"logged to MLflow run {run_id}")
    return 0


def _geneval(gen, args) -> tuple[dict, str]:
    """GenEval-lite results {steps: summary} and table."""
    from selfe.eval.runner import evaluate_steps, select_prompts, steps_table

    records = select_prompts(args.prompt_set, args.max_per_task)
    results = evaluate_steps(gen, records, args.steps, guidance=args.guidance, seed=args.seed, out_dir=args.out,
                             landing=args.landing, eta=args.eta)
    return results, steps_table(results)


def _clip_fid(gen, args) -> tuple[dict, str]:
    """CLIP score and FID results {steps: summary} on the held-out rows of the cache, and table."""
    from selfe.data.cachekey import cache_dir
    from selfe.eval.heldout import read_heldout
    from selfe.eval.realdata import build_scorer, decode_latents, evaluate_realdata_steps, realdata_table

    cfg, e = gen.cfg, gen.cfg.eval
    heldout = read_heldout(args.cache or cache_dir(cfg), e.heldout_fraction, e.num_images, cfg.data.s3_endpoint)
    reference = decode_latents(gen.codec, heldout.latents, e.batch_size)
    scorer = build_scorer(e.clip_model, e.fid_features, reference, gen.device, e.batch_size)
    results = evaluate_realdata_steps(gen, heldout, args.steps, scorer, guidance=args.guidance, seed=args.seed,
                                      out_dir=args.out, batch_size=e.batch_size, landing=args.landing, eta=args.eta)
    return results, realdata_table(results)


if __name__ == "__main__":
    sys.exit(main())
