"""Memory plan per GPU: parameters, gradients, AdamW moments and EMA under FSDP and HSDP, plus the
activation estimate per token with and without activation checkpointing (``selfe.bench.memplan``).

    python benchmarks/memory_plan.py --presets 0.5b 2b --workers 8 32 64 [--node-size 8]

Prints a Markdown table (the one in docs/benchmarks.md). The model is built on the meta device: no
memory, no GPU.
"""

from __future__ import annotations

import argparse

from selfe.config import load_config
from selfe.bench.memplan import markdown_table, plan


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["0.5b", "2b"])
    parser.add_argument("--workers", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--node-size", type=int, default=8, help="GPUs per node: HSDP's shard degree")
    args = parser.parse_args(argv)
    cfgs = {p: load_config(preset=p).model for p in args.presets}
    rows = [plan(p, cfgs[p], n, mode, args.node_size)
            for p in args.presets for n in args.workers for mode in ("fsdp", "hsdp")]
    table = markdown_table(rows, cfgs)
    print(table)
    return table


if __name__ == "__main__":
    main()
