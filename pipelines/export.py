"""Export a trained selfe model to a format other tools load.

    python pipelines/export.py --model models:/selfe@champion --format diffusers --out DIR

``diffusers``: a pipeline folder (``save_pretrained`` layout: transformer/, text_encoder/, tokenizer/,
vae/ for VAE codecs, model_index.json). Load it with ``SelfEPipeline.from_pretrained(DIR)`` (``from
selfe.export import SelfEPipeline``) or ``DiffusionPipeline.from_pretrained(DIR, custom_pipeline=
"<selfe>/export/pipeline.py", trust_remote_code=True)``; ``pipe(prompt, num_inference_steps=2,
seed=0).images`` gives the images ``pipelines/generate.py`` gives for the same prompt, seed and steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfe.cli import OneLineParser, fail, load_model_or_fail, model_ref, unwritable

FORMATS = ("diffusers",)


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=model_ref, help="models:/name@alias, models:/name/version, runs:/id/model or a folder")
    ap.add_argument("--format", choices=FORMATS, default="diffusers")
    ap.add_argument("--out", required=True, help="folder to write; must not exist or be empty")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return fail(f"--out {out} exists and is not an empty folder; choose a new path")
    if problem := unwritable(out):
        return fail(problem)
    # Export on the CPU: the written weights are float32 whatever the device, and no GPU is needed.
    gen = load_model_or_fail(args.model, args.tracking_uri, device="cpu")
    if gen is None:
        return 2
    from selfe.export import export_diffusers

    try:
        export_diffusers(gen, out)
    except (OSError, ValueError) as e:
        return fail(f"cannot export {args.model}: {str(e).splitlines()[0]}")
    print(f"wrote {out}: diffusers pipeline (SelfEPipeline.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
