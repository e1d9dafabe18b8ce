"""What GenEval-lite scores when the ground truth goes through a 2x pixel down/up round trip.

    python benchmarks/halfres_upper_bound.py

Renders every prompt of the v1 set at 32x32, average-pools it to 16x16, brings it back to 32x32
(nearest or bilinear) and scores it. This is the ceiling of a model that works on 16x16 pixels
(2x2 patches: 64 tokens, the same step cost as 4x4 patches at 32x32) behind such a codec, with the
scorer and the prompts unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from selfe.data.shapes_render import render
from selfe.eval.geneval_lite import evaluate
from selfe.eval.prompts import load_prompt_set


def main() -> None:
    records = load_prompt_set("v1")
    images = [render(r["spec"], 32, np.random.default_rng([32, i])) for i, r in enumerate(records)]
    small = F.avg_pool2d(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float(), 2)  # (N, 3, 16, 16)
    out = {}
    for mode in ("nearest", "bilinear"):
        up = F.interpolate(small, scale_factor=2, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        back = [u.permute(1, 2, 0).round().clamp(0, 255).byte().numpy() for u in up]
        _, summary = evaluate(back, records)
        out[mode] = {"overall": summary["overall"], "heldout": summary["heldout"],
                     "per_task": summary["per_task"], "prompts": len(records)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
