"""Ray Train overhead vs the plain single-process loop at equal work, and the data-wait fraction.

    python benchmarks/train_overhead.py                   # tiny preset, 120 steps at batch 32, 2 threads
    python benchmarks/train_overhead.py --steps 300 --batch 64

Both sides train the same model (same config, seed, batch, steps, torch threads) on the same cached
rows (the default shapes cache, built first if missing):

- plain: ``selfe.train.local.train_local`` in this process over batches already in memory;
- Ray Train: ``selfe.train.job.fit`` with one worker (the job's real path: Ray Data ingest, the
  worker loop, one checkpoint at the end, no MLflow).

Printed: seconds per step in the steady state (the last ``--window`` steps) for each, their ratio,
whole-run wall times (Ray: TorchTrainer start to result, including worker start-up, the final
checkpoint and teardown; Ray itself is already started), and the Ray worker's data-wait fraction.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from selfe.config import load_config


def plain(cfg, cache_path: str, steps: int, window: int) -> dict:
    from selfe.data.cache import read_null_text
    from selfe.data.loader import epoch_batches, read_cache_tensors
    from selfe.train.local import train_local

    torch.set_num_threads(cfg.train.threads_per_worker or torch.get_num_threads())
    t0 = time.perf_counter()
    rows = read_cache_tensors(cache_path)
    null = read_null_text(cache_path)
    load_s = time.perf_counter() - t0
    batches = epoch_batches(rows, cfg.train.batch_size, cfg.train.seed)
    _, _, hist = train_local(cfg, batches, null, cfg.model.num_tokens(*rows["latent"].shape[-2:]), steps)
    wall = time.perf_counter() - t0
    steady = [h["step_s"] for h in hist[-window:]]
    data = sum(h["data_s"] for h in hist[-window:])
    return {"wall_s": wall, "load_s": load_s, "step_s": sum(steady) / len(steady),
            "data_wait_frac": data / sum(steady)}


def ray_train(cfg, cache_path: str, window: int, storage: str) -> dict:
    from selfe.data.cache import load_cache, read_manifest, read_null_text
    from selfe.data.contract import latent_shape
    from selfe.encoders.text import TextEncoder
    from selfe.train.handoff import worker_inputs
    from selfe.train.job import fit

    cfg.train.storage_path = storage
    cfg.train.run_name = "overhead"
    cfg.train.log_every = window  # the worker's timers cover one log window; the last is the steady state
    cfg.train.checkpoint_every = cfg.train.steps
    cfg.tracking.enabled = False
    loop = worker_inputs(cfg, TextEncoder(cfg.text), read_null_text(cache_path), latent_shape(read_manifest(cache_path)))
    t0 = time.perf_counter()
    result = fit(cfg, "overhead", {"train": load_cache(cache_path, cfg)}, loop)
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(result.error)
    m = result.metrics  # the last window
    busy = m["compute_s"] + m["data_wait_s"]
    return {"wall_s": wall, "step_s": busy / window, "data_wait_frac": m["data_wait_frac"],
            "images_per_s": m["images_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--window", type=int, default=40, help="the last this many steps are the steady state")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args, overrides = ap.parse_known_args(argv)
    if args.steps % args.window or args.steps < 2 * args.window:
        ap.error("--steps must be a multiple of --window and at least two windows (the worker times by window)")
    cfg = load_config(overrides=[f"--train.steps={args.steps}", f"--train.batch_size={args.batch}",
                                 f"--train.threads_per_worker={args.threads}", f"--train.cpus_per_worker={args.threads}",
                                 "--train.eval_every=0", "--train.sample_every=0", *overrides])
    import ray

    from selfe.data.cache import build_cache

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=args.threads + 1)
    try:
        cache_path, _ = build_cache(cfg)
        p = plain(cfg, cache_path, args.steps, args.window)
        with tempfile.TemporaryDirectory() as tmp:
            r = ray_train(cfg, cache_path, args.window, tmp)
    finally:
        ray.shutdown()
    print(json.dumps({"plain": p, "ray_train": r, "config": asdict(cfg.train)}, default=str))
    print(f"\n{args.steps} steps at batch {args.batch}, {args.threads} torch threads; steady state = the last "
          f"{args.window} steps of each")
    print("| loop | s/step (steady) | img/s (steady) | whole run (s) | data wait |")
    print("|---|---|---|---|---|")
    print(f"| plain single process | {p['step_s']:.3f} | {args.batch / p['step_s']:.1f} | {p['wall_s']:.1f} | "
          f"{p['data_wait_frac']:.2%} |")
    print(f"| Ray Train (1 worker) | {r['step_s']:.3f} | {args.batch / r['step_s']:.1f} | {r['wall_s']:.1f} | "
          f"{r['data_wait_frac']:.2%} |")
    print(f"Ray Train / plain: {r['step_s'] / p['step_s']:.3f}x per step, {r['wall_s'] / p['wall_s']:.2f}x whole run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
