"""The Ray Train per-worker loop: FSDP2 Self-E training over a Ray Data shard with DCP checkpoints.

Every rank runs the same sequence of collectives: one training step, the EMA update, and the
same number of ``ray.train.report`` calls (a barrier), whatever its data holds.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from selfe.config import Config
from selfe.configtools import apply_dict
from selfe.ema import make_ema
from selfe.objective import SelfEObjective, TextCond
from selfe.perf import device_peak_flops, mfu, train_flops_per_image
from selfe.sampling import SamplerConfig, sample
from selfe.train.checkpoint import load_checkpoint, save_checkpoint
from selfe.train.parallel import build_sharded_model, local_fraction
from selfe.train.step import Batch, build_optimizer, lr_at, train_step

STRING_COLUMNS = ("caption", "spec")


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, data)
    return cfg


def _device(cfg: Config) -> torch.device:
    if cfg.train.use_gpu and torch.cuda.is_available():
        return ray.train.torch.get_device()
    return torch.device("cpu")


def _precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    mode = cfg.train.mixed_precision
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _to_batch(raw: dict, device: torch.device) -> Batch:
    """Cache columns -> fp32 tensors on device."""
    cond = TextCond(
        raw["text_tokens"].to(device, torch.float32),
        raw["text_mask"].to(device, torch.bool),
        raw["text_pooled"].to(device, torch.float32),
    )
    fake = None
    if "fake_tokens" in raw:
        fake = TextCond(
            raw["fake_tokens"].to(device, torch.float32), raw["fake_mask"].to(device, torch.bool),
            raw["fake_pooled"].to(device, torch.float32),
        )
    return Batch(raw["latent"].to(device, torch.float32), cond, fake)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _sample_grid(cfg: Config, ema, grid: dict, device, step_counts: list[int]) -> dict[int, np.ndarray]:
    """Sample the fixed grid prompts with the EMA at each step count (all ranks: FSDP needs them)."""
    cond = TextCond(*(grid[k].to(device) for k in ("tokens", "mask", "pooled")))
    null = TextCond(*(grid[f"null_{k}"].to(device) for k in ("tokens", "mask", "pooled")))
    shape = (cond.tokens.shape[0], cfg.model.in_channels, grid["latent_size"], grid["latent_size"])
    out = {}
    for steps in step_counts:
        g = torch.Generator(device).manual_seed(cfg.eval.seed)
        noise = torch.randn(shape, generator=g, device=device)
        sc = SamplerConfig(**{**vars(cfg.sampler), "steps": steps})
        x, _ = sample(ema, noise, cond, null, sc, cfg.model.patch_size, generator=g)
        out[steps] = x.float().cpu().numpy()
    return out


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point given to ``TorchTrainer``. ``loop_config``: {"config": resolved Config dict,
    "null_text": {...}, "grid": {...} or None, "mlflow_run_id": str or None}."""
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.threads_per_worker:
        torch.set_num_threads(cfg.train.threads_per_worker)
    device = _device(cfg)
    mp_dtype = _precision(cfg, device)
    model = build_sharded_model(
        cfg.model, device, cfg.train.seed, cfg.train.fsdp, mp_dtype, cfg.train.activation_checkpointing
    )
    # The EMA is sharded exactly like the online model, so its forwards gather shards the same way.
    ema = make_ema(model, build_sharded_model(cfg.model, device, cfg.train.seed, cfg.train.fsdp, mp_dtype))
    objective = SelfEObjective(cfg.objective)
    o = cfg.optim
    optimizer = build_optimizer(model, o.lr, o.beta1, o.beta2, o.weight_decay)
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1000 + 17 + rank)
    null = TextCond(*(loop_config["null_text"][k].to(device) for k in ("tokens", "mask", "pooled")))

    step, epoch, batch_in_epoch = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            progress = load_checkpoint(ckpt_dir, model, ema, optimizer, generator)
        step, epoch, batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
        if rank == 0:
            print(f"[selfe] resumed from step {step} (epoch {epoch}, batch {batch_in_epoch})", flush=True)

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        import mlflow

        from selfe.tracking import RunLogger

        if loop_config.get("tracking_uri"):  # workers do not inherit the driver's mlflow state
            mlflow.set_tracking_uri(loop_config["tracking_uri"])
        tracker = RunLogger(loop_config["mlflow_run_id"])

    # Share of each parameter this rank stores (about 1 / world under FSDP), reported with metrics.
    param_fraction = float(np.mean(list(local_fraction(model).values())))
    per_worker = cfg.train.batch_size // world
    n_img = (cfg.data.resolution // cfg.model.patch_size) ** 2 if cfg.codec.kind == "pixels" else None
    peak = device_peak_flops(device, "bf16" if mp_dtype else "fp32")
    shard = ray.train.get_dataset_shard("train")
    # Fault injection (tests, drills): {"step": n, "marker": path} kills the last rank once at step n.
    fault = loop_config.get("fault") or {}
    window = {"images": 0, "data_s": 0.0, "compute_s": 0.0, "start": time.perf_counter()}
    stats: dict[str, float] = {}
    model.train()
    while step < cfg.train.steps:
        batches = shard.iter_torch_batches(batch_size=per_worker, drop_last=True)
        seen = 0
        t_wait = time.perf_counter()
        for raw in batches:
            if seen < batch_in_epoch:  # resuming mid-epoch: skip what the checkpoint already trained on
                seen += 1
                t_wait = time.perf_counter()
                continue
            batch = _to_batch(raw, device)
            t_compute = time.perf_counter()
            lr = lr_at(step, o.lr, o.lr_end, o.warmup_steps, cfg.train.steps)
            stats = train_step(model, ema, objective, optimizer, batch, null, step, lr, o.grad_clip, cfg.ema,
                               generator=generator)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_done = time.perf_counter()
            window["images"] += per_worker * world
            window["data_s"] += t_compute - t_wait
            window["compute_s"] += t_done - t_compute
            step += 1
            seen += 1
            batch_in_epoch = seen
            if fault and step == fault["step"] and rank == world - 1:
                marker = Path(fault["marker"])
                if not marker.exists():
                    marker.write_text(str(step))
                    os._exit(1)  # a worker process dying mid-run, as a preempted node would
            stats["param_fraction"] = param_fraction
            _report(cfg, step, epoch, batch_in_epoch, stats, window, model, ema, optimizer, generator,
                    tracker, loop_config.get("grid"), device, n_img, peak, rank)
            t_wait = time.perf_counter()
            if step >= cfg.train.steps:
                break
        else:
            epoch += 1
            batch_in_epoch = 0
            continue
        break
    if tracker is not None:
        tracker.flush()


def _report(cfg, step, epoch, batch_in_epoch, stats, window, model, ema, optimizer, generator, tracker, grid,
            device, n_img, peak, rank) -> None:
    """Log every ``log_every`` steps; checkpoint every ``checkpoint_every`` steps and at the end.

    All ranks take the same branches (they depend only on ``step``), so reports stay in lockstep.
    """
    last = step >= cfg.train.steps
    do_ckpt = last or step % cfg.train.checkpoint_every == 0
    do_log = last or step % cfg.train.log_every == 0
    do_grid = grid is not None and cfg.train.sample_every and step % cfg.train.sample_every == 0
    if not (do_ckpt or do_log or do_grid):
        return
    metrics: dict[str, float] = {"step": step, "epoch": epoch}
    if do_log:
        elapsed = time.perf_counter() - window["start"]
        imgs = window["images"]
        metrics.update({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        metrics.update(
            images_per_s=imgs / max(elapsed, 1e-9),
            data_wait_s=window["data_s"], compute_s=window["compute_s"],
            data_wait_frac=window["data_s"] / max(window["data_s"] + window["compute_s"], 1e-9),
            peak_mem_gb=_peak_memory_gb(device),
        )
        if n_img:
            metrics["tokens_per_s"] = metrics["images_per_s"] * n_img
            flops = train_flops_per_image(cfg.model, n_img, cfg.text.max_tokens, cfg.objective.method,
                                          cfg.objective.p_s_equals_t)
            world = dist.get_world_size() if dist.is_initialized() else 1
            m = mfu(flops * imgs / max(window["compute_s"], 1e-9) / world, peak)  # per-device FLOP/s
            if m is not None:
                metrics["mfu"] = m
        window.update(images=0, data_s=0.0, compute_s=0.0, start=time.perf_counter())
        if tracker is not None:
            tracker.log_metrics(metrics, step)
            print(f"[selfe] step {step}/{cfg.train.steps} loss {metrics.get('loss', float('nan')):.4f} "
                  f"{metrics['images_per_s']:.1f} img/s", flush=True)
    if do_grid:
        grids = _sample_grid(cfg, ema, grid, device, cfg.eval.steps)
        if tracker is not None:
            tracker.log_grids(grids, step, grid.get("prompts", []), grid.get("codec"))
    if do_ckpt:
        progress = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, model, ema, optimizer, progress, generator)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)
