"""The config's walk through the code: every selfe function of the driver that receives the job config
or one of its sections, in the order of first call, during a real (tiny) training job.

    python benchmarks/config_walk.py                 # a 2-step tiny run on a local Ray, ~1 minute
    python benchmarks/config_walk.py --show          # and the walk itself, one stop per line

Prints the number of stops (distinct functions), the files they are in, and the returns: how often the
walk comes back to a file it had already left (the fewer, the more the code reads top to bottom).
The Ray Train workers are other processes and are not traced: this is the driver's side.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data.num_samples=32", "--model.double_blocks=1", "--model.single_blocks=1", "--model.width=64",
        "--model.head_dim=16", "--train.steps=2", "--train.batch_size=8", "--train.checkpoint_every=2",
        "--eval.steps=1", "--eval.max_prompts=1", "--eval.untrained_reference=false", "--train.compile=false"]


def config_parts(cfg) -> set[int]:
    """ids of the config and of every dataclass section inside it."""
    ids, todo = set(), [cfg]
    while todo:
        obj = todo.pop()
        if id(obj) in ids:
            continue
        ids.add(id(obj))
        todo += [getattr(obj, f.name) for f in dataclasses.fields(obj) if dataclasses.is_dataclass(getattr(obj, f.name))]
    return ids


def walk(cfg, run) -> list[tuple[str, str]]:
    """(file relative to the repo, function) of each selfe function that got a config part, first calls only."""
    parts, package = config_parts(cfg), str(REPO / "selfe")
    stops: dict[tuple[str, str], None] = {}

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(package):
            return
        code = frame.f_code
        args = [frame.f_locals.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
        if any(id(a) in parts for a in args):
            stops.setdefault((str(Path(code.co_filename).relative_to(REPO)), code.co_qualname), None)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return list(stops)


def returns(files: list[str]) -> int:
    """How often the sequence comes back to a file it had left."""
    seen, count, previous = set(), 0, None
    for f in files:
        if f != previous:
            count += f in seen
            seen.add(f)
            previous = f
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--show", action="store_true", help="print every stop")
    args = ap.parse_args(argv)
    import ray

    from selfe.config import load_config
    from selfe.train.job import run_training

    root = Path(tempfile.mkdtemp(prefix="selfe-walk-"))
    cfg = load_config(overrides=[*TINY, f"--data.cache_root={root / 'cache'}", f"--train.storage_path={root / 'ray'}",
                                 "--train.run_name=walk", f"--tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stops = walk(cfg, lambda: run_training(cfg, out_root=str(root / "outputs")))
    finally:
        ray.shutdown()
    files = [f for f, _ in stops]
    if args.show:
        for f, name in stops:
            print(f"  {f}:{name}")
    print(f"config walk from run_training: {len(stops)} stops in {len(set(files))} files, "
          f"{returns(files)} returns to a file already left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
