"""Ray Train overhead vs the plain single-process loop at equal work, and the data-wait fraction.

    python benchmarks/train_overhead.py                   # tiny preset, 120 steps at batch 32, 2 threads
    python benchmarks/train_overhead.py --steps 300 --batch 64

Both sides train the same model (same config, seed, batch, steps, torch threads) on the same cached
rows (the default shapes cache, built first if missing):

- plain: ``selfe.train.local.train_local`` in this process over batches already in memory;
- Ray Train: ``selfe.train.job.fit`` with one worker (the job's real path: Ray Data ingest, the
  worker loop, one checkpoint at the end, no MLflow).

``--repeats N`` runs N rounds of (plain, Ray Train) in turn and reports medians and each round's
ratio: on this shared VM one figure drifts by 10-20% from one minute to the next.

Printed: seconds per step in the steady state (the last ``--window`` steps) for each, their ratio,
whole-run wall times (Ray: TorchTrainer start to result, including worker start-up, the final
checkpoint and teardown; Ray itself is already started), the Ray worker's data-wait fraction, and
where the Ray run's fixed time went (from the worker's ``t_*`` timeline marks).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
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
    t0 = time.time()
    result = fit(cfg, "overhead", {"train": load_cache(cache_path, cfg)}, loop)
    end = time.time()
    if result.error is not None:
        raise RuntimeError(result.error)
    m = result.metrics  # the last window
    busy = m["compute_s"] + m["data_wait_s"]
    return {"wall_s": end - t0, "step_s": busy / window, "data_wait_frac": m["data_wait_frac"],
            "images_per_s": m["images_per_s"], "startup": startup_breakdown(m, t0, end)}


def startup_breakdown(m: dict, t0: float, end: float) -> dict[str, float]:
    """Seconds of each phase of a Ray Train run from the worker's timeline marks (wall clock, one machine)."""
    return {"trainer_to_worker": m["t_worker_start"] - t0,          # controller, placement group, worker start
            "model_and_restore": m["t_model_ready"] - m["t_worker_start"],  # model/EMA/optimiser build, restore
            "first_step": m["t_first_step"] - m["t_model_ready"],      # Ray Data start-up, first batch, one step
            "steps_after_first": m["t_checkpoint_start"] - m["t_first_step"],
            "final_checkpoint": m["t_checkpoint_saved"] - m["t_checkpoint_start"],
            "report_and_teardown": end - m["t_checkpoint_saved"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--window", type=int, default=40, help="the last this many steps are the steady state")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of (plain, Ray...) in turn: on a shared VM single figures drift by 10%%")
    args, overrides = ap.parse_known_args(argv)
    if args.steps % args.window or args.steps < 2 * args.window:
        ap.error("--steps must be a multiple of --window and at least two windows (the worker times by window)")
    cfg = load_config(overrides=[f"--train.steps={args.steps}", f"--train.batch_size={args.batch}",
                                 f"--train.threads_per_worker={args.threads}", f"--train.cpus_per_worker={args.threads}",
                                 "--train.eval_every=0", "--train.sample_every=0", *overrides])
    import ray

    from selfe.data.cache import build_cache

    runs: dict[str, list[dict]] = {"plain single process": [], "Ray Train, 1 worker": []}
    from selfe.storage import ensure_ray

    ensure_ray(args.threads + 1, log_to_driver=False)  # as the job starts its local Ray (worker niceness 0)
    try:
        cache_path, _ = build_cache(cfg)
        for _ in range(args.repeats):
            runs["plain single process"].append(plain(cfg, cache_path, args.steps, args.window))
            with tempfile.TemporaryDirectory() as tmp:
                runs["Ray Train, 1 worker"].append(ray_train(copy.deepcopy(cfg), cache_path, args.window, tmp))
    finally:
        ray.shutdown()
    print(json.dumps({"runs": runs, "config": asdict(cfg.train)}, default=str))
    print(f"\n{args.steps} steps at batch {args.batch}, {args.threads} torch threads, {cfg.train.cpus_per_worker:g} "
          f"CPUs reserved per worker, {args.repeats} round(s) in turn; steady state = the last {args.window} steps")
    report(runs, args.batch)
    return 0


def report(runs: dict[str, list[dict]], batch: int) -> None:
    """The table: median steady step over the rounds, each round's ratio to the plain run of that round."""
    base = next(iter(runs.values()))
    print("| loop | s/step (median) | img/s | vs plain, each round (img/s) | whole run (s, median) | data wait |")
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        step = statistics.median(r["step_s"] for r in rs)
        ratios = " ".join(f"{b['step_s'] / r['step_s']:.2f}" for b, r in zip(base, rs))
        print(f"| {name} | {step:.3f} | {batch / step:.1f} | {ratios} | "
              f"{statistics.median(r['wall_s'] for r in rs):.1f} | {statistics.median(r['data_wait_frac'] for r in rs):.2%} |")
    for name, rs in list(runs.items())[1:]:
        phases = {k: statistics.median(r["startup"][k] for r in rs) for k in rs[0]["startup"]}
        print(f"{name}, medians: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))


if __name__ == "__main__":
    sys.exit(main())
