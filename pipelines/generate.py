"""Generate images from a trained selfe model.

    python pipelines/generate.py --model models:/selfe@champion --prompt "a photo of a red circle" --steps 2 --out out.png [--device cuda]

A model whose encoders were not bundled at registration loads them from where training did; point it
elsewhere with $SELFE_TEXT_ENCODER / $SELFE_CODEC_PATH (a local dir, s3:// prefix or hub id).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from selfe.cli import (
    OneLineParser, add_device_argument, fail, finite_float, int_in, load_model_or_fail, model_ref, unwritable, utf8_text,
)
from selfe.core.sampling import MAX_STEPS


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=model_ref, help="models:/name@alias, models:/name/version, runs:/id/model or a folder")
    ap.add_argument("--prompt", action="append", required=True, type=utf8_text, help="repeat for several images")
    ap.add_argument("--steps", type=int_in(1, MAX_STEPS), default=2)
    ap.add_argument("--guidance", type=finite_float, default=None, help="CFG scale (default: the model's sampler config)")
    ap.add_argument("--eta", type=finite_float, default=None)
    ap.add_argument("--landing", choices=["auto", "next", "current", "midpoint", "hybrid"], default=None,
                    help="landing time policy; default: the model's config (auto: follows the training method)")
    ap.add_argument("--seed", type=int_in(0), default=0)
    ap.add_argument("--num", type=int_in(1, 1024), default=1, help="images per prompt")
    ap.add_argument("--scale", type=int_in(1, 64), default=4, help="upscale factor of the saved PNG (nearest)")
    ap.add_argument("--out", default="out.png", help="PNG path; several images are saved as one row")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    add_device_argument(ap)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.is_dir():
        return fail(f"--out {out} is a folder; give the path of the PNG to write, e.g. {out / 'image.png'}")
    if problem := unwritable(out.parent, "--out (its folder)"):
        return fail(problem)

    from selfe.tracking.images import grid_image, png_bytes

    gen = load_model_or_fail(args.model, args.tracking_uri, args.device)
    if gen is None:
        return 2
    prompts = [p for p in args.prompt for _ in range(args.num)]
    with warnings.catch_warnings(record=True) as notes:  # e.g. a prompt longer than the text encoder reads
        warnings.simplefilter("always", UserWarning)
        images, nfe = gen.generate(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed, eta=args.eta,
                                   landing=args.landing)
    for note in dict.fromkeys(str(n.message) for n in notes if issubclass(n.category, UserWarning)):
        print(f"note: {note}", file=sys.stderr)
    out.write_bytes(png_bytes(grid_image({0: np.asarray(images)}) if len(images) > 1 else images[0], scale=args.scale))
    print(f"wrote {out}: {len(images)} image(s), {args.steps} steps, {nfe} NFE per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
