"""Ray Tune sweeps of Self-E training: the self-evaluation weight, the tau annealing horizon, p(s = t),
text dropout and the evaluation guidance, with ASHA on the few-step GenEval-lite score.

    python tune/sweep.py                                        # tune/default.toml: tiny preset, CPU, ~12 min
    python tune/sweep.py --space tune/self_eval_schedule.toml --name se-1     # rerun the name to resume it
    python tune/sweep.py --search random --num-samples 8 --train.steps=400
    ray job submit --working-dir . -- python tune/sweep.py --space tune/<file>.toml --name NAME

One MLflow parent run per sweep, one child run per trial; the best trial's model is registered with
alias ``sweep-best``. ``--section.field=value`` arguments override [base] for every trial.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from selfe.cli import OneLineParser, fail, int_in, loaded, print_fields
from selfe.configtools import ConfigError
from selfe.paths import check_outputs
from selfe.sweep.space import load_space

DEFAULT_SPACE = Path(__file__).resolve().parent / "default.toml"


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default=str(DEFAULT_SPACE), help="search-space TOML (see tune/*.toml)")
    ap.add_argument("--name", help="sweep name; an existing one is resumed (default: [sweep] name, else timestamped)")
    ap.add_argument("--resume", action="store_true", help="continue the named sweep; fail if it does not exist")
    ap.add_argument("--search", choices=["grid", "random", "optuna"], help="override [sweep] search")
    ap.add_argument("--num-samples", type=int_in(1), help="override [sweep] num_samples")
    ap.add_argument("--max-concurrent", type=int_in(0), help="override [sweep] max_concurrent (0: from the cluster)")
    ap.add_argument("--storage-path", help="override [sweep] storage_path (local folder or s3://)")
    ap.add_argument("--out", default="outputs", help="local folder for the summary, plot and best model")
    ap.add_argument("--print-space", action="store_true", help="print the validated sweep spec and exit")
    args, overrides = ap.parse_known_args(argv)
    from selfe.sweep.space import spec_to_json

    spec = loaded(lambda: load_space(args.space, overrides, name=args.name, search=args.search,
                                     num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                                     storage_path=args.storage_path),
                  spec_to_json if args.print_space else None)
    if isinstance(spec, int):
        return spec
    if args.resume and not spec.name:
        return fail("--resume needs the sweep's name (--name or [sweep] name)")
    from selfe.sweep.runner import SWEEP_BEST_ALIAS, run_sweep

    try:
        base = spec.base_config()
        base.train.storage_path = spec.storage_path  # the trials' checkpoints live inside the sweep folder
        check_outputs(base, args.out, storage_setting="[sweep] storage_path")
        res = run_sweep(spec, resume=args.resume, out_root=args.out)
    except ConfigError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"\nstopped; rerun with --name {spec.name or '<the name printed above>'} to continue the sweep",
              file=sys.stderr)
        return 130
    print(f"\n=== selfe sweep {res.name} finished in {res.wall_s / 60:.1f} min ===")
    print(res.table)
    fields = []
    if res.best is None:
        print("no trial reported the metric with a checkpoint: nothing to register")
    else:
        setting = ", ".join(f"{k}={v}" for k, v in res.best.params.items())
        fields.append(("winner", f"trial {res.best.trial_id}: {setting} ({spec.metric} = {res.best.metric:.4f}, "
                                 f"{res.best.outcome} at step {res.best.step})"))
        tied = [r.trial_id for r in res.rows if r is not res.best and r.outcome == res.best.outcome
                and r.metric == res.best.metric]
        if tied:
            fields.append(("", f"tied with {', '.join(tied)}: the first trial wins ties; these trials are too "
                               "short to separate the settings (raise train.steps)"))
    fields.append(("summary", f"{res.out_dir}/summary.md" + (f", plot {res.plot_path}" if res.plot_path else "")))
    fields.append(("sweep folder", f"{res.path} (python tune/sweep.py --name {res.name} --resume continues it)"))
    if res.parent_run_id:
        fields.append(("MLflow parent", f"{res.parent_run_id} at {os.environ.get('MLFLOW_TRACKING_URI', '')}"))
    if res.model_version is not None:
        fields.append(("registered", f"models:/{spec.base_config().tracking.registered_model}/{res.model_version} "
                                     f"(alias @{SWEEP_BEST_ALIAS})"))
    print_fields(fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
