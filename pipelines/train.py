"""Train a Self-E text-to-image model on Ray and register it in MLflow.

    python pipelines/train.py                                  # embedded default: shapes world, tiny model, CPU
    python pipelines/train.py --config my.toml --train.steps=5000 --optim.lr=1e-4
    ray job submit --working-dir . -- python pipelines/train.py --config clusters/configs/0.5b.toml

Relative output settings (outputs/, ./mlflow.db) resolve under $SELFE_HOME when it is set; a
submitted Ray job runs in Ray's temporary copy of the working directory, so there it needs
$SELFE_HOME (or absolute settings) and refuses to start without.

Every ``--section.field=value`` overrides the config; unknown keys fail before any work starts.
"""

from __future__ import annotations

import argparse
import sys

from selfe.config import load_config
from selfe.configtools import ConfigError
from selfe.paths import anchor_outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML config file (see configs/)")
    ap.add_argument("--promote", action="store_true", help="also set the 'champion' alias on the new version")
    ap.add_argument("--out", default="outputs", help="local folder for the exported model, eval tables and grids")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        args.out = anchor_outputs(cfg, args.out)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.dump())
        return 0
    from selfe.train.job import run_training

    res = run_training(cfg, promote=args.promote, out_root=args.out)
    print("\n=== selfe training finished ===")
    print(f"run name:        {res.run_name} (re-run with --train.run_name={res.run_name} to resume)")
    print(f"steps:           {res.final_step} in {res.train_seconds:.0f} s of training")
    print(f"checkpoint:      {res.checkpoint_path}")
    print(f"model folder:    {res.model_dir}")
    if res.grid_path:
        print(f"sample grid:     {res.grid_path} (rows: steps {cfg.eval.steps}; prompts in samples.txt)")
    if res.mlflow_run_id:
        print(f"MLflow run:      {res.mlflow_run_id} at {__import__('os').environ.get('MLFLOW_TRACKING_URI')}")
        if res.model_version is not None:
            print(f"registered:      models:/{cfg.tracking.registered_model}/{res.model_version} "
                  f"(alias @{cfg.tracking.alias}{', @champion' if args.promote or cfg.tracking.promote_champion else ''})")
        print("browse:          mlflow ui --backend-store-uri " + __import__("os").environ.get("MLFLOW_TRACKING_URI", ""))
    if res.registration_error:
        print(f"NOT registered:  {res.registration_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
