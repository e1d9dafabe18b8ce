"""How long a checkpoint stops training: local write and Ray Train's upload, each synchronous or in the
background.

    python benchmarks/checkpoint_stall.py                        # ~6 min on 2 cores, alone
    python benchmarks/checkpoint_stall.py --width 512 --blocks 6 --storage s3://...   # a bigger state, remote

Runs ``pipelines/train.py`` (local Ray, one worker) once per mode on a model big enough for the copy to
matter (default: width 384, 4 + 4 blocks; the checkpoint holds model, EMA and both Adam moments),
checkpointing every ``--every`` steps:

* write sync, upload sync: the folder is written, then copied to storage, then training goes on;
* write sync, upload async (``train.checkpoint_upload``): Ray Train copies it in the background;
* write async, upload async (``train.checkpoint_write``, the default): the state is copied into host
  memory and a background thread writes it; the checkpoint is reported at the next report.

Every report carries the training time the reported checkpoints took from the loop so far
(``checkpoint_stall_s``, ``checkpoints_reported``; the worker's ``selfe.train.writer``). The last
checkpoint of a run is written at once whatever the mode, so the figure is read from it: the mean stall
of the others. The training time (first step to the last checkpoint) shows what background writing
costs the steps beside it (on 2 cores the writer thread competes with the training threads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = (("sync", "sync"), ("sync", "async"), ("async", "async"))


def stall(run_dir: Path) -> tuple[float, int, float]:
    """(mean stall per checkpoint before the last, their count, training seconds) of a finished run."""
    results = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    last = max((r["metrics"] for r in results), key=lambda m: m["step"])
    n = last["checkpoints_reported"]
    return last["checkpoint_stall_s"] / max(n, 1), n, last["t_checkpoint_start"] - last["t_first_step"]


def run(write: str, upload: str, work: Path, args) -> dict:
    name = f"stall-{write}-{upload}"
    cmd = [sys.executable, str(REPO / "pipelines/train.py"), "--data.num_samples=64", f"--train.steps={args.steps}",
           f"--train.checkpoint_every={args.every}", f"--train.keep_checkpoints={args.steps // args.every + 1}",
           f"--train.checkpoint_write={write}", f"--train.checkpoint_upload={upload}", "--train.compile=false",
           "--train.batch_size=8", f"--train.log_every={args.every}",
           f"--model.width={args.width}", f"--model.double_blocks={args.blocks}", f"--model.single_blocks={args.blocks}",
           "--tracking.enabled=false", "--eval.steps=1", "--eval.max_prompts=1", "--eval.untrained_reference=false",
           f"--train.storage_path={args.storage or work / 'ray'}", f"--data.cache_root={work / 'cache'}",
           f"--train.run_name={name}", f"--out={work / 'out'}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    mean, n, train_s = stall((Path(args.storage) if args.storage else work / "ray") / name)
    return {"write": write, "upload": upload, "checkpoints": n, "stall_s": mean, "train_s": train_s,
            "job_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--storage", help="train.storage_path (default: a local folder)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="selfe-stall-"))
    rows = [run(write, upload, work, args) for write, upload in MODES]
    print("\n| write | upload | checkpoints | mean stall per checkpoint | training (first step to last checkpoint) | job |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['write']} | {r['upload']} | {r['checkpoints']} | {r['stall_s']:.2f} s | {r['train_s']:.1f} s | "
              f"{r['job_s']} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
