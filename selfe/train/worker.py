"""The Ray Train per-worker loop: FSDP2 Self-E training over a Ray Data shard with DCP checkpoints.

Every rank runs the same sequence of collectives: one training step, the EMA update, the same
sampling passes and the same number of ``ray.train.report`` calls (a barrier), whatever its
data holds. Which of those happen depends only on the step counter.

One batch, cache to loss: ``shard_batches`` (Ray Data rows, shuffled) -> ``contract.batch_from_rows``
(a fp32 `Batch`) -> ``step.train_step`` -> ``SelfEObjective.__call__``.
"""

from __future__ import annotations

import resource
import threading
import time
from typing import Any

import numpy as np
import ray.train
import ray.util
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from selfe.core.ema import ema_decay_at, make_ema
from selfe.core.objective import SelfEObjective
from selfe.core.sampling import resolve_sampler, sample
from selfe.data.contract import batch_from_rows
from selfe.data.loader import global_batches, shard_batches
from selfe.eval.metrics import METRIC_MODES, UNSCORED, periodic_metrics
from selfe.perf import device_peak_flops, mfu, train_flops_per_image
from selfe.train.checkpoint import load_checkpoint
from selfe.train.handoff import PLACEMENT_GROUP_KEY, EncodedPrompts, WorkerInputs
from selfe.train.parallel import build_sharded_model, is_sharded, local_fraction
from selfe.train import sigterm
from selfe.train.resume import restore_first_usable
from selfe.train.step import Share, Trainee, build_optimizer, lr_at, mixed_precision_dtype, train_step
from selfe.train.writer import CheckpointWriter


def node_threads(local_workers: int) -> int:
    """torch threads for one of ``local_workers`` workers on this node: the node's CPUs as Ray counts
    them (``ray start --num-cpus``, ``ray.init(num_cpus=...)``), split evenly, at least 1. Ray's count,
    not the machine's, so a node limited to fewer CPUs than it has keeps to them."""
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node), 0.0)
    return max(1, int(cpus // max(local_workers, 1)))


PRINT_EVERY_S = 30.0
"""Least seconds between two progress lines on the console (MLflow gets every ``train.log_every``)."""


def format_eta(seconds: float) -> str:
    """12 s, 3m05s, 1h02m; "?" before the rate is known."""
    if not seconds == seconds or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class WorkerLoop:
    """State of one rank: sharded model and EMA, optimiser, RNG, progress counters and timers."""

    def __init__(self, inputs: WorkerInputs) -> None:
        cfg = self.cfg = inputs.cfg
        self.inputs = inputs
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.threads = cfg.train.threads_per_worker or node_threads(ctx.get_local_world_size())
        torch.set_num_threads(self.threads)
        use_cuda = cfg.train.use_gpu and torch.cuda.is_available()
        self.device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
        mp_dtype = mixed_precision_dtype(cfg.train.mixed_precision, self.device)
        model = build_sharded_model(cfg.model, cfg.train, self.device)
        # The EMA is sharded exactly like the online model, so its forwards gather shards the same way.
        ema = make_ema(model, build_sharded_model(cfg.model, cfg.train, self.device, activation_checkpointing=False))
        # Sharded models get bf16 from FSDP's MixedPrecisionPolicy; an unsharded one needs autocast.
        self.tr = Trainee(model, ema, SelfEObjective(cfg.objective, inputs.image_tokens),
                          build_optimizer(model, cfg.optim), cfg.optim.grad_clip,
                          mp_dtype if not is_sharded(model) else None,
                          # One stream on every worker: each draws the global batch's choices and keeps its rows.
                          torch.Generator(self.device).manual_seed(cfg.train.seed * 1000 + 17))
        self.null = inputs.null.to(self.device)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.resumed_from = -1  # the step of the checkpoint this run resumed from (reported, for tests)
        group = ray.util.get_current_placement_group()  # fixed for the worker's life
        self.placement_group = group.id.hex() if group else ""
        self.share = Share(cfg.train.batch_size, self.world, self.rank, cfg.train.micro_batch_size)
        self.peak = device_peak_flops(self.device, "bf16" if mp_dtype else "fp32", cfg.train.peak_tflops)
        # Share of each parameter this rank stores (about 1 / world under FSDP).
        self.param_fraction = float(np.mean(list(local_fraction(model).values())))
        self.suite = cfg.eval.resolved_suite(cfg.data.source)
        # The last periodic scores, carried in every report (Tune needs its metric in each); the worst
        # value until the first evaluation, which is then not logged to MLflow.
        self.fewstep = {name: UNSCORED[METRIC_MODES[name]] for name in periodic_metrics(self.suite)}
        self.scored = False
        self.realdata = None  # clip_fid: CLIP, feature net and reference statistics, loaded on rank 0 once
        self.codec = None  # the image codec of the periodic evaluations, built at the first one
        self.window = {"images": 0, "data_s": 0.0, "compute_s": 0.0, "start": time.perf_counter()}
        # Wall-clock (time.time) marks of the start-up and of the last step and checkpoint, carried in
        # every report (``run_facts``): where a run's fixed cost goes (benchmarks/train_overhead.py).
        self.timeline: dict[str, float] = {}
        self.writer = CheckpointWriter(cfg.train, self.world, self.device, self.timeline, lambda: self.run_facts)
        self.tracker = self._tracker()
        self.printed = -PRINT_EVERY_S  # when the last progress line was printed (perf_counter)
        self.preempt_answered = False  # a drain notice was answered (one checkpoint per notice)
        self.leaving = False  # a rank got a SIGTERM: after this step's checkpoint, it exits

    def _tracker(self):
        if self.rank != 0 or self.inputs.tracking is None:
            return None
        from selfe.tracking.runlog import RunLogger

        t = self.inputs.tracking
        return RunLogger(t.run_id, spool_dir=t.spool_dir, tracking_uri=t.tracking_uri)

    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        tr = self.tr
        progress, _ = restore_first_usable(
            checkpoint, lambda d: load_checkpoint(d, tr.model, tr.ema, tr.optimizer, tr.generator), mark=self.rank == 0)
        self.step, self.epoch, self.batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
        self.resumed_from = self.step
        if self.rank == 0:
            print(f"[selfe] resumed from step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})",
                  flush=True)

    def run(self) -> None:
        cfg = self.cfg
        shard = ray.train.get_dataset_shard("train")
        self.tr.model.train()
        if self.rank == 0:
            print(f"[selfe] training {cfg.train.steps} steps at batch {cfg.train.batch_size} on {self.world} "
                  f"worker(s) x {self.threads} torch thread(s)"
                  + (": compiling the blocks first (slow first steps)" if cfg.train.compile else ""), flush=True)
        while self.step < cfg.train.steps:
            seen, t_wait = 0, time.perf_counter()
            for raw in self._batches(shard):
                seen += 1
                if seen <= self.batch_in_epoch:  # resuming mid-epoch: skip what the checkpoint trained on
                    t_wait = time.perf_counter()
                    continue
                stats = self._train_one(batch_from_rows(raw, self.device), t_wait)
                self.batch_in_epoch = seen
                for hook in self.inputs.step_hooks:
                    hook(self.step, self.rank, self.world, stats)
                self.report(stats)
                t_wait = time.perf_counter()
                if self.step >= cfg.train.steps:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
                continue
            break
        self.writer.flush()
        if self.tracker is not None:
            self.tracker.close()

    def _batches(self, shard):
        """This worker's rows of each global batch of the current epoch. Global order: every worker
        reads the whole stream in the order of (seed, epoch) and keeps its rows, so batch k of an epoch
        is the same samples whatever the worker count, and ``batch_in_epoch`` (global batches consumed)
        places a resume at any size exactly. Sharded: each worker reads its own split in its own
        order; a resume at another size skips as many samples, not the same ones."""
        t, (lo, hi), buffer = self.cfg.train, self.share.rows, self.cfg.data.shuffle_buffer_rows
        if t.global_order:
            return global_batches(shard, t.batch_size, (lo, hi), t.seed, self.epoch, buffer)
        return shard_batches(shard, hi - lo, t.seed, self.epoch, self.rank, buffer)

    def _train_one(self, batch, t_wait: float) -> dict[str, float]:
        """One optimiser step on ``batch``; the window's timers split data wait from compute."""
        cfg, t_compute = self.cfg, time.perf_counter()
        stats = train_step(self.tr, batch, self.null, self.step, lr_at(self.step, cfg.optim, cfg.train.steps),
                           ema_decay_at(self.step, cfg.ema, cfg.train.batch_size), self.share)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.window["images"] += cfg.train.batch_size
        self.window["data_s"] += t_compute - t_wait
        self.window["compute_s"] += time.perf_counter() - t_compute
        self.step += 1
        if "first_step" not in self.timeline:  # no clock read on every later step
            self.timeline["first_step"] = time.time()
        return stats

    def report(self, stats: dict[str, float]) -> None:
        """Log every ``log_every`` steps, sample grids / evaluate / checkpoint on their schedules."""
        t, step = self.cfg.train, self.step
        self.writer.poll()
        last = step >= t.steps
        due = lambda every: bool(every) and (step % every == 0 or last)  # noqa: E731
        do_ckpt, do_log = due(t.checkpoint_every) or self._preemption_checkpoint(), due(t.log_every)
        do_grid = self.inputs.grid is not None and due(t.sample_every)
        do_eval = self.inputs.periodic_eval is not None and due(t.eval_every)
        if not (do_ckpt or do_log or do_grid or do_eval):
            return
        metrics: dict[str, float] = {"step": step, "epoch": self.epoch}
        if do_eval:
            self.fewstep, self.scored = self._periodic_eval(), True
        if do_log:
            metrics.update(self._throughput(stats))
        if self.tracker is not None and (do_log or do_eval):
            self.tracker.log_metrics({**metrics, **(self.fewstep if self.scored else {})}, step)
        if self.inputs.periodic_eval is not None:
            metrics.update(self.fewstep)
        if do_log and self.rank == 0 and (last or time.perf_counter() - self.printed >= PRINT_EVERY_S):
            # This process's first window includes start-up and compiling (a resume too): no ETA from it.
            first, self.printed = self.printed < 0, time.perf_counter()
            rate = metrics.get("images_per_s", 0.0)
            eta = (t.steps - step) * t.batch_size / rate if rate > 0 and not first else float("nan")
            print(f"[selfe] step {step}/{t.steps} loss {metrics.get('loss', float('nan')):.4f} "
                  f"{rate:.1f} img/s ETA {format_eta(eta)}", flush=True)
        if do_grid:
            self._log_grid(step)
        if do_ckpt:
            self._checkpoint(metrics, now=self.leaving or last)
            if self.leaving:
                self._leave()
        else:
            self.writer.flush()  # a checkpoint written since the last report goes first
            ray.train.report({**metrics, **self.run_facts})

    def _checkpoint(self, metrics: dict[str, float], now: bool = False) -> None:
        """Checkpoint this step (``selfe.train.writer``); ``now``: written and uploaded before training
        goes on (a worker about to exit, the last step)."""
        progress = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
        self.writer.save(self.tr, progress, metrics, now=now)

    def _preemption_checkpoint(self) -> bool:
        """Whether to checkpoint at this step because a worker is being preempted: Ray's drain notice
        for a node of the group (a spot reclaim, or ``ray drain-node`` from a pod's preStop hook), or a
        SIGTERM to a worker process (``selfe.train.sigterm``).

        The drain notice is asked every ``train.preemption_check_every`` steps on every rank
        (``ray.train.get_preemption_info`` is a barrier that gives every rank the same answer), a
        SIGTERM at every step (one all-reduce of two numbers). One checkpoint per notice, written when
        the last save's duration fits in the time left: the drain deadline, or
        ``train.preemption_grace_s`` (counted from the SIGTERM). The decision is the minimum over ranks,
        so all ranks write or none does. A rank that got the SIGTERM then leaves (``_leave``)."""
        t = self.cfg.train
        drain = None
        if t.preemption_check_every and not self.step % t.preemption_check_every and not self.preempt_answered:
            drain = ray.train.get_preemption_info()
        answers_sigterm = t.preemption_grace_s > 0
        if drain is None and not answers_sigterm:
            return False
        left = sigterm.time_left()
        if drain is not None:
            left = min(left, drain.deadline_ms / 1000 - time.time() if drain.deadline_ms else t.preemption_grace_s)
        leaving = sigterm.received_at() is not None
        # [time left after a save like the last, -(this rank got a SIGTERM)]: MIN over ranks.
        notice = [left - self.writer.save_s, -float(leaving)]
        if dist.is_initialized() and self.world > 1:
            reduced = torch.tensor(notice, dtype=torch.float64, device=self.device)
            dist.all_reduce(reduced, op=dist.ReduceOp.MIN)
            notice = reduced.tolist()
        margin, self.leaving = notice[0], notice[1] < 0
        if margin == float("inf"):
            return False
        self.preempt_answered |= drain is not None
        save = margin > 0
        if self.rank == 0:
            who = f"rank(s) {drain.preempted_ranks}" if drain is not None else "a worker (SIGTERM)"
            print(f"[selfe] preemption notice for {who}, {margin + self.writer.save_s:.0f} s left: "
                  + (f"checkpoint at step {self.step}" if save else
                     f"no time for a checkpoint (the last took {self.writer.save_s:.1f} s)"), flush=True)
        if not save and self.leaving:
            self._leave()
        return save

    def _leave(self) -> None:
        """After a SIGTERM: the rank that got it exits (Ray Train restarts or shrinks the group from
        the checkpoint just reported); the others go on until Ray Train stops the group. Every rank
        first reports once more, and ``report`` returns only once the previous report (the notice's
        checkpoint) was taken by the controller, so the checkpoint is registered before a rank dies."""
        self.writer.flush()
        ray.train.report({"step": self.step, "epoch": self.epoch, **self.run_facts})
        if dist.is_initialized() and self.world > 1:
            dist.barrier()
        self.leaving = False
        if sigterm.received_at() is not None:
            sigterm.leave()
            threading.Event().wait()  # the main thread ends the process; no more collectives from here

    @property
    def run_facts(self) -> dict[str, Any]:
        """What every report carries besides the metrics: the step this run resumed from (-1: fresh),
        its workers' placement group (``PLACEMENT_GROUP_KEY``), the training time its reported
        checkpoints took and their count, and the timeline marks so far (``t_*``)."""
        return {"resumed_from": self.resumed_from, PLACEMENT_GROUP_KEY: self.placement_group,
                "checkpoint_stall_s": self.writer.stall_s, "checkpoints_reported": self.writer.reported,
                **{f"t_{k}": v for k, v in self.timeline.items()}}

    def _log_grid(self, step: int) -> None:
        from selfe.tracking.images import log_grids

        latents = {s: self._sample(self.inputs.grid, s) for s in self.cfg.eval.steps}
        if self.tracker is not None:
            log_grids(self.tracker, latents, step, self.cfg.codec)

    def _throughput(self, stats: dict[str, float]) -> dict[str, float]:
        """Images/s, image tokens/s and MFU over the window since the last log, for every codec."""
        w, cfg = self.window, self.cfg
        elapsed = time.perf_counter() - w["start"]
        out = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        out.update(
            param_fraction=self.param_fraction, torch_threads=self.threads, workers=self.world,
            # Graphs compiled so far in this process: flat after warm-up unless something recompiles.
            **({"compiled_graphs": counters["stats"]["unique_graphs"]} if self.cfg.train.compile else {}),
            images_per_s=w["images"] / max(elapsed, 1e-9),
            data_wait_s=w["data_s"], compute_s=w["compute_s"],
            data_wait_frac=w["data_s"] / max(w["data_s"] + w["compute_s"], 1e-9),
            peak_mem_gb=_peak_memory_gb(self.device),
        )
        n_img = self.inputs.image_tokens
        out["tokens_per_s"] = out["images_per_s"] * n_img
        flops = train_flops_per_image(cfg.model, n_img, cfg.text.max_tokens, cfg.objective.method,
                                      cfg.objective.p_s_equals_t)
        world = dist.get_world_size() if dist.is_initialized() else 1
        per_device = flops * w["images"] / max(w["compute_s"], 1e-9) / world  # model FLOP/s of one device
        out["tflops_per_s"] = per_device / 1e12
        m = mfu(per_device, self.peak)
        if m is not None:
            out["mfu"] = m
        w.update(images=0, data_s=0.0, compute_s=0.0, start=time.perf_counter())
        return out

    @torch.no_grad()
    def _sample(self, prompts: EncodedPrompts, steps: int) -> np.ndarray:
        """EMA samples for pre-encoded prompts (on every rank: the sharded EMA needs them all)."""
        cfg = self.cfg
        cond = prompts.cond.to(self.device)
        g = torch.Generator(self.device).manual_seed(cfg.eval.seed)
        noise = torch.randn((cond.tokens.shape[0], *self.inputs.latent_shape), generator=g, device=self.device)
        sc = resolve_sampler(cfg.sampler, cfg.objective.method, steps)
        x, _ = sample(self.tr.ema, noise, cond, self.null, sc, cfg.shift_mu(self.inputs.latent_shape[1:]), generator=g)
        return x.float().cpu().numpy()

    def _periodic_eval(self) -> dict[str, float]:
        """The quick quality signal Tune's scheduler ranks trials by, averaged over the few-step counts
        (default 1, 2, 4): GenEval-lite overall, or (clip_fid) FID and CLIP score on held-out rows.
        Every rank samples (the sharded EMA needs them all); GenEval-lite is scored on every rank, the
        networks of clip_fid on rank 0 only (Ray Train keeps rank 0's metrics)."""
        from selfe.encoders.image import build_codec, tensor_to_images
        from selfe.eval.geneval_lite import evaluate
        from selfe.eval.metrics import CLIP_FEWSTEP_METRIC, FEWSTEP_METRIC, FID_FEWSTEP_METRIC

        pe = self.inputs.periodic_eval
        if self.codec is None:  # built once per worker process, not per evaluation (a VAE on the GPU presets)
            self.codec = build_codec(self.cfg.codec, device=self.device)
        codec = self.codec
        scores: dict[str, list[float]] = {}
        for steps in self.cfg.eval.periodic_steps:
            images = tensor_to_images(codec.decode(torch.from_numpy(self._sample(pe, steps)).to(self.device)))
            if self.suite == "geneval_lite":
                scores.setdefault(FEWSTEP_METRIC, []).append(evaluate(list(images), pe.records)[1]["overall"])
            elif self.rank == 0:
                summary, _ = self._realdata_scorer(codec).score(images, pe.prompts)
                scores.setdefault(FID_FEWSTEP_METRIC, []).append(summary["fid"])
                scores.setdefault(CLIP_FEWSTEP_METRIC, []).append(summary["clip_score"])
        return {name: float(np.mean(values)) for name, values in scores.items()} or self.fewstep

    def _realdata_scorer(self, codec):
        """CLIP, the FID feature net and the held-out reference statistics, built at the first use."""
        if self.realdata is None:
            from selfe.eval.realdata import build_scorer, decode_latents

            e = self.cfg.eval
            reference = decode_latents(codec, self.inputs.periodic_latents, e.batch_size)
            self.realdata = build_scorer(e.clip_model, e.fid_features, reference, self.device, e.batch_size)
        return self.realdata


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point given to ``TorchTrainer``: ``loop_config = {"inputs": WorkerInputs}`` (see
    ``selfe.train.handoff``)."""
    started = time.time()
    loop = WorkerLoop(loop_config["inputs"])
    loop.restore()
    loop.timeline.update(worker_start=started, model_ready=time.time())
    loop.run()
