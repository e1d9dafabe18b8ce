"""Score a model's sampler settings per step count on the development prompt set, to choose defaults.

    python benchmarks/sampler_defaults.py --model outputs/<run>/model --eta 0 0.5 1 --guidance 1.5 2 3
    python benchmarks/sampler_defaults.py --model models:/selfe@candidate --json outputs/sampler_dev.json

Every (steps, guidance omega, eta, landing) cell is GenEval-lite on the ``dev`` prompt set (another draw of v1's
tasks, ``selfe.eval.prompts.build_prompt_set_dev``) with its own noise seed, so the defaults chosen here
are not tuned to the v1 prompts and noise that the reports score. Prints one table per step count
(overall +- binomial SE, per task) and the best cell per step count; ``--json`` keeps every summary so
several models (training seeds, methods) can be pooled before choosing. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from selfe.cli import OneLineParser, finite_float, int_in, load_model_or_fail, model_ref
from selfe.core.sampling import AUTO, LANDING_POLICIES, MAX_STEPS
from selfe.eval.runner import evaluate_steps, select_prompts

DEV_SEED = 4321
"""Noise seed of the development runs (the reports use eval.seed, 1234)."""


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=model_ref)
    ap.add_argument("--steps", type=int_in(1, MAX_STEPS), nargs="+", default=[1, 2, 4, 8, 50])
    ap.add_argument("--eta", type=finite_float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--guidance", type=finite_float, nargs="+", default=None,
                    help="default: the model's sampler.guidance only")
    ap.add_argument("--landing", choices=[AUTO, *LANDING_POLICIES], nargs="+", default=[AUTO],
                    help="landing policies to try (default: the method's own, auto)")
    ap.add_argument("--max-per-task", type=int_in(0), default=20)
    ap.add_argument("--seed", type=int_in(0), default=DEV_SEED)
    ap.add_argument("--json", default=None, help="write every cell's summary here")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)

    gen = load_model_or_fail(args.model, args.tracking_uri, "cpu")
    if gen is None:
        return 2
    records = select_prompts("dev", args.max_per_task)
    guidances = args.guidance or [gen.cfg.sampler.guidance]
    cells = []
    for steps in args.steps:
        for omega in guidances:
            for eta, landing in itertools.product(args.eta, args.landing):
                summary = evaluate_steps(gen, records, [steps], guidance=omega, eta=eta, landing=landing,
                                         seed=args.seed, batch_size=gen.cfg.eval.batch_size)[steps]
                cells.append({"steps": steps, "guidance": omega, "eta": eta, "landing": landing, **summary})
                print(f"steps {steps:>3}  omega {omega:<4g} eta {eta:<4g} landing {landing:<8} "
                      f"{summary['overall']:.3f} +- "
                      f"{summary['overall_se']:.3f}  " + " ".join(f"{t} {v:.2f}" for t, v in summary["per_task"].items())
                      + f"  ({summary['seconds']:.0f} s)", flush=True)
    print(f"\nbest per step count ({len(records)} dev prompts, seed {args.seed}, method "
          f"{gen.cfg.objective.method}):")
    for steps in args.steps:
        best = max((c for c in cells if c["steps"] == steps), key=lambda c: c["overall"])
        print(f"  {steps:>3} steps: omega {best['guidance']:g}, eta {best['eta']:g}, landing {best['landing']}: "
              f"{best['overall']:.3f} +- "
              f"{best['overall_se']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "method": gen.cfg.objective.method,
                                               "seed": args.seed, "cells": cells}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
