"""How long a checkpoint stops training, with Ray Train's upload synchronous and asynchronous.

    python benchmarks/checkpoint_stall.py                        # ~5 min on 2 cores, alone
    python benchmarks/checkpoint_stall.py --width 512 --blocks 6 --storage s3://...   # a bigger state, remote

Runs ``pipelines/train.py`` (local Ray, one worker) once per ``train.checkpoint_upload`` mode on a model
big enough for the copy to matter (default: width 384, 4 + 4 blocks; the checkpoint holds model, EMA
and both Adam moments), checkpointing every ``--every`` steps. Each report carries
the worker's timeline marks (``t_checkpoint_start``, ``t_checkpoint_saved`` after the local write,
``t_checkpoint_reported`` once ``ray.train.report`` returned); Ray Train's snapshot keeps them per
checkpoint, so the stall of checkpoint k is its ``reported - start`` (read from checkpoint k + 1's
metrics) and the local write its ``saved - start``. Prints one row per mode: the median stall, the
median local write and the run's training time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stalls(run_dir: Path) -> tuple[list[float], list[float]]:
    """(stall s, local write s) of every checkpoint whose successor is registered."""
    results = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    marks = sorted((r["metrics"] for r in results), key=lambda m: m["step"])
    stall = [b["t_checkpoint_reported"] - a["t_checkpoint_start"] for a, b in zip(marks, marks[1:])
             if "t_checkpoint_reported" in b]
    write = [m["t_checkpoint_saved"] - m["t_checkpoint_start"] for m in marks]
    return stall, write


def run(mode: str, work: Path, args) -> dict:
    name = f"stall-{mode}"
    cmd = [sys.executable, str(REPO / "pipelines/train.py"), "--data.num_samples=64", f"--train.steps={args.steps}",
           f"--train.checkpoint_every={args.every}", f"--train.keep_checkpoints={args.steps // args.every + 1}",
           f"--train.checkpoint_upload={mode}", "--train.compile=false", "--train.batch_size=8",
           f"--model.width={args.width}", f"--model.double_blocks={args.blocks}", f"--model.single_blocks={args.blocks}",
           "--tracking.enabled=false", "--eval.steps=1", "--eval.max_prompts=1", "--eval.untrained_reference=false",
           f"--train.storage_path={args.storage or work / 'ray'}", f"--data.cache_root={work / 'cache'}",
           f"--train.run_name={name}", f"--out={work / 'out'}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    stall, write = stalls((Path(args.storage) if args.storage else work / "ray") / name)
    return {"mode": mode, "checkpoints": len(write), "stall_s": statistics.median(stall),
            "write_s": statistics.median(write), "job_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--storage", help="train.storage_path (default: a local folder)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="selfe-stall-"))
    rows = [run(mode, work, args) for mode in ("sync", "async")]
    print("\n| upload | checkpoints | median stall per checkpoint | of it, the local write | job |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['checkpoints']} | {r['stall_s']:.2f} s | {r['write_s']:.2f} s | {r['job_s']} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
