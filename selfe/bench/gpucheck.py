"""The sections of ``benchmarks/gpu_check.py``: step time, MFU, compile, activation checkpointing,
peak memory and sampling latency of one model on one device, each timed and guarded.

Two profiles: ``GPU`` (the ``0.5b`` widths, bf16, 1,024 image tokens) and ``CPU`` (tiny widths, fp32,
64 tokens: a smoke run that proves the script works). Random tensors stand in for data in the
step-time sections: step cost does not depend on their content. train_shapes (real training) is
``selfe.bench.gpucheck_train``.
"""

from __future__ import annotations

import copy
import gc
import platform
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from selfe.bench.steptime import bench_trainee, random_batch, timed_steps
from selfe.config import Config, load_config
from selfe.core.model import MODEL_PRESETS, build_model
from selfe.perf import device_peak_flops, mfu, train_flops_per_image
from selfe.train.parallel import apply_activation_checkpointing, compile_blocks, one_rank_group, shard
from selfe.train.step import Trainee, build_optimizer, train_step


@dataclass
class Profile:
    """What one gpu_check run measures and at which sizes."""

    name: str
    dtype: str
    """Compute dtype of the step-time and sampling sections: "bf16" (autocast) or "fp32"."""
    preset: str
    overrides: list[str]
    """Config overrides of the step-time and sampling model (on top of ``preset``)."""
    latent_side: int
    """Side of the random latents: tokens per image = (side / patch)^2."""
    text_tokens: int
    batch: int
    warmup_steps: int
    """Steps before timing; with compiled blocks they include the compilation."""
    timed_steps: int
    compile_backend: str
    sample_batch: int
    sample_steps: list[int]
    sample_repeats: int
    train_overrides: list[str]
    """train_shapes' config (tiny preset + these): the shapes world and the small model."""
    train_steps: int
    train_samples: int
    eval_max_per_task: int
    """GenEval-lite prompts per (task, split): 6 tasks x 2 splits x this many."""
    eval_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    budget_s: float = 480.0


GPU = Profile(
    name="gpu", dtype="bf16", preset="0.5b", overrides=["--model.double_blocks=2", "--model.single_blocks=4"],
    latent_side=64, text_tokens=64, batch=32, warmup_steps=3, timed_steps=10, compile_backend="inductor",
    sample_batch=16, sample_steps=[1, 2, 4, 8, 50], sample_repeats=3,
    # 64x64 pixels, 4x4 patches (256 tokens), width 256: the reproduce-gpu recipe at a quarter of the width.
    train_overrides=["--data.resolution=64", "--codec.pixel_downsample=1", "--model.patch_size=4",
                     "--model.width=256", "--model.head_dim=64", "--train.batch_size=64",
                     "--optim.warmup_steps=30"],
    train_steps=300, train_samples=4000, eval_max_per_task=5, budget_s=480.0)

CPU = Profile(
    name="cpu", dtype="fp32", preset="tiny",
    overrides=["--model.width=64", "--model.head_dim=16", "--model.double_blocks=1", "--model.single_blocks=1"],
    latent_side=16, text_tokens=16, batch=8, warmup_steps=3, timed_steps=8,
    # inductor would spend most of a minute generating C++ on 2 cores: aot_eager runs the same Dynamo
    # capture and AOTAutograd graphs (so it proves the compiled path) without code generation.
    compile_backend="aot_eager", sample_batch=2, sample_steps=[1, 2, 4, 8, 50], sample_repeats=1,
    # 32x32 pixels pooled to 16x16, 2x2 patches (64 tokens), tiny widths: the tiny preset's recipe.
    train_overrides=["--model.width=64", "--model.head_dim=16", "--train.batch_size=16",
                     "--optim.warmup_steps=5"],
    train_steps=30, train_samples=192, eval_max_per_task=1, budget_s=110.0)


def device_info(device: torch.device) -> dict[str, Any]:
    """The device line: device name, torch and CUDA versions (CUDA "none" on a CPU build)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"
    cuda = torch.version.cuda or "none"
    return {"name": name, "torch": torch.__version__, "cuda": cuda,
            "line": f"{name} | torch {torch.__version__} | CUDA {cuda}"}


class Checker:
    """Runs sections under one global time budget; a failing section records its error and the
    run goes on, a section that would start after the budget is spent is skipped with a note."""

    def __init__(self, budget_s: float, device: torch.device) -> None:
        self.budget_s, self.device = budget_s, device
        self.start = time.perf_counter()
        self.sections: dict[str, dict[str, Any]] = {}

    def remaining_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Record {"status": ok|error|skipped, "seconds", "result" | "error" | "note"} under ``name``."""
        if self.remaining_s() <= 0:
            self.sections[name] = {"status": "skipped", "seconds": 0.0,
                                   "note": f"global budget of {self.budget_s:g} s spent before this section"}
            return
        t0 = time.perf_counter()
        try:
            entry = {"status": "ok", "result": fn()}
        except Exception as e:  # noqa: BLE001 -- one section's failure must not end the check
            entry = {"status": "error", "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc(limit=6)[-2000:]}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.sections[name] = entry
        free_memory(self.device)


def free_memory(device: torch.device) -> None:
    """Drop what a finished measurement left, so the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def saved_for_backward_bytes(tr: Trainee, data, null) -> int:
    """Bytes autograd keeps for backward over one optimiser step: distinct storages packed by
    ``saved_tensors_hooks``, parameters excluded (their bf16 copies under autocast count). The
    activation share of peak memory, measurable on any device; under non-reentrant activation
    checkpointing only the blocks' inputs and what lies outside the blocks are seen (the
    checkpoint's own hooks take the rest)."""
    params = {p.untyped_storage().data_ptr() for p in tr.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(tr, data, null, 10_000, 1e-4, 0.999)
    return sum(seen.values())


def fsdp_trainee(tr: Trainee, cfg: Config, dtype: str) -> Trainee:
    """``tr`` as a Ray Train worker holds it under FSDP2: model and EMA ``fully_shard``-ed per block over the
    default process group, bf16 through ``MixedPrecisionPolicy`` (fp32 master weights and reductions) instead
    of autocast, and an optimiser over the sharded parameters."""
    mp_dtype = torch.bfloat16 if dtype == "bf16" else None
    shard(tr.model, mp_dtype)
    shard(tr.ema, mp_dtype)
    return replace(tr, optimizer=build_optimizer(tr.model, cfg.optim), autocast=None)


def measure(cfg: Config, profile: Profile, device: torch.device, method: str,
            compiled: bool = False, checkpointing: bool = False, fsdp: bool = False) -> dict[str, Any]:
    """One training configuration on random data. Returns:
    step_s (median optimiser-step seconds after warm-up), images_per_s (batch / step_s),
    model_tflops_per_s (model FLOPs done per second, ``selfe.perf.train_flops_per_image``), mfu (that
    over the device's dense peak for the dtype; None where unknown, e.g. CPUs), warmup_s (wall time
    of the warm-up steps: compilation included when compiled), peak_mem_gib
    (``torch.cuda.max_memory_allocated`` over the whole configuration, CUDA only) and
    saved_mib (``saved_for_backward_bytes``, eager unsharded only: saved-tensor hooks do not see into compiled
    graphs, and under FSDP the gathered parameters would count as activations). ``fsdp`` needs an
    initialised process group (``one_rank_group``)."""
    cfg = copy.deepcopy(cfg)
    free_memory(device)
    tokens = cfg.model.num_tokens(profile.latent_side, profile.latent_side)
    tr = bench_trainee(cfg, method, tokens, device, profile.dtype)  # its EMA is made before checkpointing
    if checkpointing:
        apply_activation_checkpointing(tr.model)
    if fsdp:
        tr = fsdp_trainee(tr, cfg, profile.dtype)
    if compiled:
        torch._dynamo.reset()  # a fresh cache, so warmup_s holds the whole compilation
        compile_blocks(tr.model, profile.compile_backend)
        compile_blocks(tr.ema, profile.compile_backend)
    data, null = random_batch(cfg, profile.batch, profile.latent_side, profile.text_tokens, device)
    warm = timed_steps(tr, data, null, profile.warmup_steps, device)
    times = sorted(timed_steps(tr, data, null, profile.timed_steps, device))
    step_s = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    saved = None if compiled or fsdp else saved_for_backward_bytes(tr, data, null) / 2**20
    flops = train_flops_per_image(cfg.model, tokens, profile.text_tokens, method, cfg.objective.p_s_equals_t)
    achieved = flops * profile.batch / step_s
    util = mfu(achieved, device_peak_flops(device, profile.dtype))
    return {"method": method, "compiled": compiled, "checkpointing": checkpointing, "fsdp": fsdp,
            "step_s": round(step_s, 5), "images_per_s": round(profile.batch / step_s, 2),
            "model_tflops_per_s": round(achieved / 1e12, 4), "mfu": None if util is None else round(util, 4),
            "warmup_s": round(sum(warm), 3), "peak_mem_gib": None if peak is None else round(peak, 3),
            "saved_mib": None if saved is None else round(saved, 2)}


class StepBench:
    """The step-time and sampling model's config and the configurations measured so far (each measured once,
    shared by the sections that compare them)."""

    def __init__(self, profile: Profile, device: torch.device, extra_overrides: list[str] | None = None) -> None:
        self.profile, self.device = profile, device
        self.overrides = [*profile.overrides, *(extra_overrides or [])]
        self.cfg = load_config(preset=profile.preset, overrides=self.overrides)
        self.runs: dict[str, dict[str, Any]] = {}

    def run(self, method: str, compiled: bool = False, checkpointing: bool = False,
            fsdp: bool = False) -> dict[str, Any]:
        key = f"{method}{' compiled' if compiled else ''}{' +ckpt' if checkpointing else ''}{' fsdp' if fsdp else ''}"
        if key not in self.runs:
            self.runs[key] = measure(self.cfg, self.profile, self.device, method, compiled, checkpointing, fsdp)
        return self.runs[key]

    def model_line(self) -> dict[str, Any]:
        """What the step-time sections ran: parameters, blocks, widths, tokens, batch, dtype."""
        m, p = self.cfg.model, self.profile
        params = sum(x.numel() for x in build_model(m, "meta").parameters())
        full = MODEL_PRESETS[p.preset]
        note = (f"{p.preset} widths with {m.double_blocks} double + {m.single_blocks} single blocks "
                f"(the preset has {full['double_blocks']} + {full['single_blocks']})")
        return {"preset": p.preset, "note": note, "overrides": self.overrides, "params_M": round(params / 1e6, 2),
                "width": m.width, "head_dim": m.head_dim, "double_blocks": m.double_blocks,
                "single_blocks": m.single_blocks, "latent": f"{p.latent_side}x{p.latent_side}x{m.in_channels}",
                "patch": m.patch_size, "image_tokens": m.num_tokens(p.latent_side, p.latent_side),
                "text_tokens": p.text_tokens, "batch": p.batch, "dtype": p.dtype}


def throughput(bench: StepBench) -> dict[str, Any]:
    """Section throughput: images/s, model TFLOP/s and MFU of Self-E and flow matching, eager."""
    rows = [bench.run("self_e"), bench.run("flow_matching")]
    return {**bench.model_line(), "rows": rows}


def method_ratio(bench: StepBench) -> dict[str, Any]:
    """Section method_ratio: Self-E step time over flow-matching step time (same model, batch); the method
    predicts ~1.33 (two extra no-grad forwards on the share of samples with s < t)."""
    se, fm = bench.run("self_e"), bench.run("flow_matching")
    return {"self_e_step_s": se["step_s"], "flow_matching_step_s": fm["step_s"],
            "self_e_over_fm": round(se["step_s"] / fm["step_s"], 3)}


def fsdp_cost(bench: StepBench) -> dict[str, Any]:
    """Section fsdp: Self-E under FSDP2 on one rank (the wrapping a Ray Train worker uses; bf16 from
    ``MixedPrecisionPolicy`` with fp32 master weights) vs unsharded with autocast: what the per-block
    all-gather and reduce-scatter machinery costs when there is nothing to gather."""
    plain = bench.run("self_e")
    with one_rank_group(bench.device):
        sharded = bench.run("self_e", fsdp=True)
    return {"plain_step_s": plain["step_s"], "fsdp_step_s": sharded["step_s"],
            "fsdp_over_plain": round(sharded["step_s"] / plain["step_s"], 3), "fsdp_mfu": sharded["mfu"],
            "rows": [plain, sharded]}


def compile_speed(bench: StepBench) -> dict[str, Any]:
    """Section compile: Self-E with eager vs compiled blocks (model and EMA). compile_s is the compiled
    warm-up minus as many steady compiled steps: the time compilation added."""
    eager, comp = bench.run("self_e"), bench.run("self_e", compiled=True)
    compile_s = comp["warmup_s"] - bench.profile.warmup_steps * comp["step_s"]
    return {"backend": bench.profile.compile_backend, "eager_step_s": eager["step_s"],
            "compiled_step_s": comp["step_s"], "compiled_over_eager": round(comp["step_s"] / eager["step_s"], 3),
            "compile_s": round(compile_s, 2), "rows": [eager, comp]}


def production(bench: StepBench) -> dict[str, Any]:
    """Section production: Self-E and flow matching as the GPU presets train them, compiled blocks under
    one-rank FSDP2 (bf16 from ``MixedPrecisionPolicy``): the MFU of each and the Self-E / flow-matching
    step ratio. The figures issue 34 sets targets for (at full depth: ``--blocks 8,16``)."""
    with one_rank_group(bench.device):
        se = bench.run("self_e", compiled=True, fsdp=True)
        fm = bench.run("flow_matching", compiled=True, fsdp=True)
    return {"self_e_mfu": se["mfu"], "flow_matching_mfu": fm["mfu"], "self_e_step_s": se["step_s"],
            "flow_matching_step_s": fm["step_s"], "self_e_over_fm": round(se["step_s"] / fm["step_s"], 3),
            "rows": [se, fm]}


def checkpointing_cost(bench: StepBench) -> dict[str, Any]:
    """Section checkpointing: Self-E with activation checkpointing off vs on: step time (recompute cost) and
    memory (peak on CUDA; saved-for-backward bytes everywhere)."""
    off, on = bench.run("self_e"), bench.run("self_e", checkpointing=True)
    out = {"step_s_off": off["step_s"], "step_s_on": on["step_s"],
           "on_over_off": round(on["step_s"] / off["step_s"], 3),
           "saved_mib_off": off["saved_mib"], "saved_mib_on": on["saved_mib"]}
    if off["peak_mem_gib"] is not None:
        out.update(peak_mem_gib_off=off["peak_mem_gib"], peak_mem_gib_on=on["peak_mem_gib"])
    return {**out, "rows": [off, on]}


def memory_table(bench: StepBench) -> dict[str, Any]:
    """Section memory: peak memory of every configuration the other sections measured (CUDA; None on CPU) and the
    bytes saved for backward (eager configurations). Runs last."""
    rows = [{"config": key, "peak_mem_gib": r["peak_mem_gib"], "saved_mib": r["saved_mib"]}
            for key, r in bench.runs.items()]
    if not rows:
        raise RuntimeError("no configuration was measured (the step-time sections failed or were skipped)")
    return {"source": "torch.cuda.max_memory_allocated" if bench.device.type == "cuda"
            else "CPU: no allocator statistics; saved-for-backward bytes only", "rows": rows}


def sampling_latency(bench: StepBench) -> dict[str, Any]:
    """Section sampling: ms to sample one batch at each step count with the config's guidance (EP-CFG:
    2 NFE per step), random weights and prompts; per step and per image follow."""
    from selfe.bench.latency import random_conditions, time_sampling

    p, device = bench.profile, bench.device
    torch.manual_seed(0)
    model = build_model(bench.cfg.model, device).eval()
    base = random_conditions(bench.cfg, p.sample_batch).to(device)
    rows = []
    for steps in p.sample_steps:
        ms, nfe = time_sampling(model, bench.cfg, base, base[:1], p.latent_side, steps, bench.cfg.sampler.guidance,
                                device, p.dtype, p.sample_repeats)
        rows.append({"steps": steps, "nfe": nfe, "ms_per_batch": round(ms, 2), "ms_per_step": round(ms / steps, 3),
                     "ms_per_image": round(ms / p.sample_batch, 3)})
    return {"batch": p.sample_batch, "guidance": bench.cfg.sampler.guidance, "dtype": p.dtype, "rows": rows}
