"""One recipe probe: train the plain loop on the shapes cache for a time budget, then score and draw.

    python benchmarks/recipe_probe.py --name fm_p2 --minutes 5 --objective.method=flow_matching --model.patch_size=2
    python benchmarks/recipe_probe.py --name se --minutes 5 --eval-steps 1 2 8 50
    python benchmarks/recipe_probe.py --name fm_p2_w --load outputs/probes/fm_p2 --guidance 2 5 --eta 0 1

Any ``--section.field=value`` override goes to the config (tiny preset). Training runs
``selfe.train.local.train_local`` in this process over the cache held in memory (shuffled each epoch),
so a probe measures the recipe and nothing of Ray. The EMA model is scored with GenEval-lite on
``--max-per-task`` prompts per (task, split) (20: the 180-prompt set) at ``--eval-steps``, with the
sampler defaults of the config, and a sample grid (rows = step counts) is written next to a JSON record
under ``--out``; the EMA model is saved as ``--out/NAME`` so that ``--load`` can score it again under
other sampler settings without training. Run probes one at a time: on 2 cores a probe beside another job measures nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from selfe.config import load_config


def train(cfg, minutes: float, save_dir: Path, snapshot_min: float = 0.0) -> tuple[torch.nn.Module, dict]:
    """Plain-loop training on the in-memory cache for ``minutes``; saves the EMA model to ``save_dir``,
    and every ``snapshot_min`` minutes of training to ``save_dir`` + ``_<minutes>m``."""
    import ray

    from selfe.data.cache import build_cache, read_null_text
    from selfe.data.loader import epoch_batches, read_cache_tensors
    from selfe.generator import save_model_dir
    from selfe.train.local import train_local

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        cache_path, _ = build_cache(cfg)
    finally:
        ray.shutdown()
    rows = read_cache_tensors(cache_path)
    null = read_null_text(cache_path)
    deadline = time.perf_counter() + 60 * minutes

    def on_step(step: int, stats: dict) -> None:
        if step % 100 == 0:
            print(f"step {step} loss {stats['loss']:.4f} lr {stats['lr']:.2e} {stats['step_s']:.3f}s", flush=True)

    t0 = time.perf_counter()
    next_snapshot = [snapshot_min]

    def on_ema(step: int, ema: torch.nn.Module) -> None:
        minutes_in = (time.perf_counter() - t0) / 60
        if snapshot_min and minutes_in >= next_snapshot[0]:
            path = save_dir.with_name(f"{save_dir.name}_{next_snapshot[0]:g}m")
            save_model_dir(path, ema, cfg, {"step": step + 1, "minutes": minutes_in})
            print(f"snapshot {path} at step {step + 1}", flush=True)
            next_snapshot[0] += snapshot_min

    _, ema, hist = train_local(cfg, epoch_batches(rows, cfg.train.batch_size, cfg.train.seed), null,
                               cfg.model.num_tokens(*rows["latent"].shape[-2:]), on_step=on_step, on_ema=on_ema,
                               stop=lambda: time.perf_counter() > deadline)
    train_s = time.perf_counter() - t0
    steps = len(hist)
    images = steps * cfg.train.batch_size
    print(f"trained {steps} steps ({images} images) in {train_s:.0f} s: {images / train_s:.1f} img/s", flush=True)
    save_model_dir(save_dir, ema, cfg, {"step": steps})
    return ema, {"steps": steps, "images": images, "train_s": train_s, "img_per_s": images / train_s,
                 "final_loss": sum(h["loss"] for h in hist[-50:]) / max(len(hist[-50:]), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget (wall, this process)")
    ap.add_argument("--eval-steps", type=int, nargs="+", default=[2, 8, 50])
    ap.add_argument("--max-per-task", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="+", default=None,
                    help="score at each of these CFG scales (default: the config's sampler.guidance)")
    ap.add_argument("--eta", type=float, nargs="+", default=None,
                    help="score at each of these DDIM etas (default: the config's sampler.eta)")
    ap.add_argument("--snapshot-min", type=float, default=0.0,
                    help="also save the EMA model every this many minutes of training (score later with --load)")
    ap.add_argument("--load", default=None, help="score a saved probe model folder instead of training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="outputs/probes")
    args, overrides = ap.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    from selfe.eval.runner import evaluate_steps, select_prompts
    from selfe.generator import load_generator
    from selfe.tracking.images import grid_image, png_bytes

    out = Path(args.out)
    if args.load:
        gen, record = load_generator(args.load), {"loaded": args.load}
        cfg = gen.cfg
    else:
        # train.steps only sets the schedules' length (lr decay, tau horizon); the probe stops at the budget.
        cfg = load_config(overrides=overrides)
        _, record = train(cfg, args.minutes, out / args.name, args.snapshot_min)
        gen = load_generator(out / args.name)  # the saved EMA, eager (a compiled one would recompile per shape)
    records = select_prompts(cfg.eval.prompt_set, max_per_task=args.max_per_task)
    n = len(records)
    t1 = time.perf_counter()
    results = {}
    for w in args.guidance or [cfg.sampler.guidance]:
        for eta in args.eta or [cfg.sampler.eta]:
            for s, r in evaluate_steps(gen, records, args.eval_steps, guidance=w, seed=cfg.eval.seed, eta=eta).items():
                results[f"w{w:g}/eta{'auto' if eta is None else f'{eta:g}'}/{s}"] = {
                    "overall": r["overall"], "se": math.sqrt(r["overall"] * (1 - r["overall"]) / n),
                    "per_task": r["per_task"]}
    eval_s = time.perf_counter() - t1
    out.mkdir(parents=True, exist_ok=True)
    grid_prompts = [r["prompt"] for r in records[:: max(len(records) // 10, 1)]][:10]
    w0, eta0 = (args.guidance or [None])[0], (args.eta or [None])[0]
    rows = {s: gen.generate(grid_prompts, steps=s, seed=cfg.eval.seed, guidance=w0, eta=eta0)[0]
            for s in args.eval_steps}
    (out / f"{args.name}.png").write_bytes(png_bytes(grid_image(rows)))
    record.update(name=args.name, overrides=overrides, eval_s=eval_s, prompts=n, results=results)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    line = " ".join(f"{k}:{v['overall']:.3f}" for k, v in results.items())
    print(f"RESULT {args.name} {line} (n={n}, eval {eval_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
