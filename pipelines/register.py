"""Register an exported model in MLflow later, e.g. after the tracking server was down when the job ended.

    python pipelines/register.py --model-dir outputs/<run>/model --run-id <mlflow run id> [--name selfe]
                                 [--alias candidate] [--promote]

``pipelines/train.py`` prints this command, filled in, when registration failed. It logs the folder as
the run's pyfunc model, registers it and sets the alias (and ``champion`` with ``--promote``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfe.cli import OneLineParser, fail
from selfe.configtools import NAME_PATTERN


def _name(text: str) -> str:
    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '.', '_' or '-'")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="the exported model folder (model.safetensors + config)")
    ap.add_argument("--run-id", required=True, help="the MLflow run the model belongs to")
    ap.add_argument("--name", type=_name, default="selfe", help="registered model name")
    ap.add_argument("--alias", type=_name, default="candidate")
    ap.add_argument("--promote", action="store_true", help="also point the 'champion' alias at it")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = ap.parse_args(argv)

    from selfe.generator import WEIGHTS

    if not (Path(args.model_dir) / WEIGHTS).is_file():
        return fail(f"{args.model_dir} holds no {WEIGHTS}: pass the model folder the training job exported")
    from selfe.tracking.registry import log_and_register
    from selfe.tracking.runs import TrackingError, TrackingUnavailable, use_tracking_uri, with_retries

    use_tracking_uri(args.tracking_uri)
    try:
        version = with_retries("registering the model", lambda: log_and_register(
            args.run_id, args.model_dir, args.name, args.alias, args.promote))
    except (TrackingUnavailable, TrackingError) as e:
        return fail(str(e).splitlines()[0])
    print(f"registered models:/{args.name}/{version} (alias @{args.alias}{', @champion' if args.promote else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
