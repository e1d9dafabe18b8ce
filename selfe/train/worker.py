"""The Ray Train per-worker loop: FSDP2 Self-E training over a Ray Data shard with DCP checkpoints.

Every rank runs the same sequence of collectives: one training step, the EMA update, the same
sampling passes and the same number of ``ray.train.report`` calls (a barrier), whatever its
data holds. Which of those happen depends only on the step counter.
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
from selfe.data.loader import batch_from_rows, shard_batches
from selfe.ema import ema_decay_at, make_ema
from selfe.objective import SelfEObjective, TextCond
from selfe.perf import device_peak_flops, mfu, train_flops_per_image
from selfe.sampling import SamplerConfig, resolve_landing, sample
from selfe.train.checkpoint import load_checkpoint, save_checkpoint
from selfe.train.parallel import build_sharded_model, is_sharded, local_fraction
from selfe.train.resume import restore_first_usable
from selfe.train.step import build_optimizer, lr_at, mixed_precision_dtype, train_step

STRING_COLUMNS = ("caption", "spec")
FEWSTEP_METRIC = "geneval_fewstep"


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, data)
    return cfg


def _cond(d: dict, device: torch.device, prefix: str = "") -> TextCond:
    return TextCond(*(d[f"{prefix}{k}"].to(device) for k in ("tokens", "mask", "pooled")))


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class WorkerLoop:
    """State of one rank: sharded model and EMA, optimiser, RNG, progress counters and timers."""

    def __init__(self, loop_config: dict) -> None:
        cfg = self.cfg = config_from_dict(loop_config["config"])
        self.loop_config = loop_config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if cfg.train.threads_per_worker:
            torch.set_num_threads(cfg.train.threads_per_worker)
        use_cuda = cfg.train.use_gpu and torch.cuda.is_available()
        self.device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
        mp_dtype = mixed_precision_dtype(cfg.train.mixed_precision, self.device)
        t = cfg.train
        self.model = build_sharded_model(cfg.model, self.device, t.seed, t.fsdp, mp_dtype, t.activation_checkpointing)
        # The EMA is sharded exactly like the online model, so its forwards gather shards the same way.
        self.ema = make_ema(self.model, build_sharded_model(cfg.model, self.device, t.seed, t.fsdp, mp_dtype))
        # Sharded models get bf16 from FSDP's MixedPrecisionPolicy; an unsharded one needs autocast.
        self.autocast = mp_dtype if not is_sharded(self.model) else None
        self.objective = SelfEObjective(cfg.objective)
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, o.beta1, o.beta2, o.weight_decay)
        self.generator = torch.Generator(self.device).manual_seed(t.seed * 1000 + 17 + self.rank)
        self.null = _cond(loop_config["null_text"], self.device)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.resumed_from = -1  # the step of the checkpoint this run resumed from (reported, for tests)
        self.per_worker = t.batch_size // self.world
        side = cfg.data.resolution // cfg.codec.pixel_downsample
        self.n_img = (side // cfg.model.patch_size) ** 2 if cfg.codec.kind == "pixels" else None
        self.peak = device_peak_flops(self.device, "bf16" if mp_dtype else "fp32")
        # Share of each parameter this rank stores (about 1 / world under FSDP).
        self.param_fraction = float(np.mean(list(local_fraction(self.model).values())))
        self.fewstep = 0.0  # last periodic GenEval-lite score, carried in every report (Tune needs it)
        self.window = {"images": 0, "data_s": 0.0, "compute_s": 0.0, "start": time.perf_counter()}
        self.tracker = self._tracker()

    def _tracker(self):
        if self.rank != 0 or not self.loop_config.get("mlflow_run_id"):
            return None
        import mlflow

        from selfe.runlog import RunLogger

        if self.loop_config.get("tracking_uri"):  # workers do not inherit the driver's mlflow state
            mlflow.set_tracking_uri(self.loop_config["tracking_uri"])
        return RunLogger(self.loop_config["mlflow_run_id"], spool_dir=self.loop_config.get("metrics_spool"))

    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        progress, path = restore_first_usable(
            checkpoint, lambda d: load_checkpoint(d, self.model, self.ema, self.optimizer, self.generator))
        self.step, self.epoch, self.batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
        self.resumed_from = self.step
        if self.rank == 0:
            print(f"[selfe] resumed from step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})",
                  flush=True)

    def run(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        shard = ray.train.get_dataset_shard("train")
        fault = self.loop_config.get("fault") or {}  # {"step": n, "marker": path}: kill the last rank once
        self.model.train()
        while self.step < cfg.train.steps:
            seen, t_wait = 0, time.perf_counter()
            batches = shard_batches(shard, self.per_worker, cfg.train.seed, self.epoch, self.rank,
                                    cfg.data.shuffle_buffer_rows)
            for raw in batches:
                seen += 1
                if seen <= self.batch_in_epoch:  # resuming mid-epoch: skip what the checkpoint trained on
                    t_wait = time.perf_counter()
                    continue
                batch = batch_from_rows(raw, self.device)
                t_compute = time.perf_counter()
                lr = lr_at(self.step, o.lr, o.lr_end, o.warmup_steps, cfg.train.steps)
                stats = train_step(self.model, self.ema, self.objective, self.optimizer, batch, self.null, self.step,
                                   lr, o.grad_clip, ema_decay_at(self.step, cfg.ema, cfg.train.batch_size),
                                   self.autocast, self.generator)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.window["images"] += self.per_worker * self.world
                self.window["data_s"] += t_compute - t_wait
                self.window["compute_s"] += time.perf_counter() - t_compute
                self.step += 1
                self.batch_in_epoch = seen
                if fault and self.step == fault["step"] and self.rank == self.world - 1:
                    marker = Path(fault["marker"])
                    if not marker.exists():
                        marker.write_text(str(self.step))
                        os._exit(1)  # a worker process dying mid-run, as a preempted node would
                self.report(stats)
                t_wait = time.perf_counter()
                if self.step >= cfg.train.steps:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
                continue
            break
        if self.tracker is not None:
            self.tracker.close()

    def report(self, stats: dict[str, float]) -> None:
        """Log every ``log_every`` steps, sample grids / evaluate / checkpoint on their schedules."""
        t, step = self.cfg.train, self.step
        last = step >= t.steps
        due = lambda every: bool(every) and (step % every == 0 or last)  # noqa: E731
        do_ckpt, do_log = due(t.checkpoint_every), due(t.log_every)
        do_grid = self.loop_config.get("grid") is not None and due(t.sample_every)
        do_eval = self.loop_config.get("periodic_eval") is not None and due(t.eval_every)
        if not (do_ckpt or do_log or do_grid or do_eval):
            return
        metrics: dict[str, float] = {"step": step, "epoch": self.epoch}
        if do_eval:
            self.fewstep = self._periodic_eval()
        if do_log:
            metrics.update(self._throughput(stats))
        if self.loop_config.get("periodic_eval") is not None:
            metrics[FEWSTEP_METRIC] = self.fewstep
        if self.tracker is not None and (do_log or do_eval):
            self.tracker.log_metrics(metrics, step)
            if do_log:
                print(f"[selfe] step {step}/{t.steps} loss {metrics.get('loss', float('nan')):.4f} "
                      f"{metrics.get('images_per_s', 0):.1f} img/s", flush=True)
        if do_grid:
            from selfe.tracking import log_grids

            grid = self.loop_config["grid"]
            latents = {s: self._sample(grid, s) for s in self.cfg.eval.steps}
            if self.tracker is not None:
                log_grids(self.tracker, latents, step, self.cfg.codec)
        if do_ckpt:
            progress = {"step": step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, self.model, self.ema, self.optimizer, progress, self.generator)
                ray.train.report({**metrics, "resumed_from": self.resumed_from},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({**metrics, "resumed_from": self.resumed_from})

    def _throughput(self, stats: dict[str, float]) -> dict[str, float]:
        w = self.window
        elapsed = time.perf_counter() - w["start"]
        out = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        out.update(
            param_fraction=self.param_fraction, images_per_s=w["images"] / max(elapsed, 1e-9),
            data_wait_s=w["data_s"], compute_s=w["compute_s"],
            data_wait_frac=w["data_s"] / max(w["data_s"] + w["compute_s"], 1e-9),
            peak_mem_gb=_peak_memory_gb(self.device),
        )
        if self.n_img:
            out["tokens_per_s"] = out["images_per_s"] * self.n_img
            flops = train_flops_per_image(self.cfg.model, self.n_img, self.cfg.text.max_tokens,
                                          self.cfg.objective.method, self.cfg.objective.p_s_equals_t)
            world = dist.get_world_size() if dist.is_initialized() else 1
            m = mfu(flops * w["images"] / max(w["compute_s"], 1e-9) / world, self.peak)  # per-device FLOP/s
            if m is not None:
                out["mfu"] = m
        w.update(images=0, data_s=0.0, compute_s=0.0, start=time.perf_counter())
        return out

    @torch.no_grad()
    def _sample(self, prompts: dict, steps: int) -> np.ndarray:
        """EMA samples for pre-encoded prompts (on every rank: the sharded EMA needs them all)."""
        cfg = self.cfg
        cond = _cond(prompts, self.device)
        size = prompts["latent_size"]
        g = torch.Generator(self.device).manual_seed(cfg.eval.seed)
        noise = torch.randn((cond.tokens.shape[0], cfg.model.in_channels, size, size), generator=g, device=self.device)
        sc = SamplerConfig(**{**vars(cfg.sampler), "steps": steps,
                              "landing": resolve_landing(cfg.sampler.landing, cfg.objective.method)})
        x, _ = sample(self.ema, noise, cond, self.null, sc, cfg.model.patch_size, generator=g)
        return x.float().cpu().numpy()

    def _periodic_eval(self) -> float:
        """Mean GenEval-lite overall over the few-step counts (default 1, 2, 4): the quick quality
        signal Tune's scheduler ranks trials by. Every rank samples; all compute the same score."""
        from selfe.encoders.image import build_codec, tensor_to_images
        from selfe.eval.geneval_lite import evaluate

        pe = self.loop_config["periodic_eval"]
        codec = build_codec(self.cfg.codec)
        scores = []
        for steps in self.cfg.eval.periodic_steps:
            images = tensor_to_images(codec.decode(torch.from_numpy(self._sample(pe, steps))))
            scores.append(evaluate(list(images), pe["records"])[1]["overall"])
        return float(np.mean(scores))


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point given to ``TorchTrainer``. ``loop_config``: {"config": resolved Config dict,
    "null_text": {...}, "grid": prompts dict or None, "periodic_eval": prompts dict or None,
    "mlflow_run_id": str or None, "tracking_uri": str, "fault": dict or None}."""
    loop = WorkerLoop(loop_config)
    loop.restore()
    loop.run()
