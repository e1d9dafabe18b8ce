"""The GPU study in one call: Self-E and flow matching, each trained for the same wall time on the
64x64 shapes world with the reproduction study's ``gpu`` model (benchmarks/configs/reproduce-gpu.toml:
71M parameters, 256 image tokens, batch 256, bf16), then scored with GenEval-lite at 1/2/4/8/50 steps
with each method's per-step sampler defaults; a sample grid per method and one table.

    python benchmarks/gpu_study.py                    # one GPU, about 8 minutes (--train-s 180 per method)
    python benchmarks/gpu_study.py --profile cpu      # the CI smoke profile: tiny model, about a minute

Pure torch (``selfe.train.local``): no Ray, no MLflow, nothing written but ``--out``.

Equal wall time, and schedules that finish: a short eager probe of each method measures its step time,
the method is then trained for ``train_s / step time`` steps (learning rate, tau annealing and EMA run
over exactly those steps; the warm-up is 5% of them unless ``--optim.warmup_steps`` is given), and a
deadline at 1.15 x ``train_s`` stops a run that turns out slower.
The probe runs the step as training does (same batch, dtype and compile setting).

Writes ``gpu_study.json``, ``gpu_study.md`` and ``grid_<method>.png`` (rows: step counts; columns: the
grid prompts, listed in the .md) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("self_e", "flow_matching")


@dataclass(frozen=True)
class StudyProfile:
    name: str
    config: str | None
    """A TOML of benchmarks/configs (None: the tiny preset)."""
    overrides: tuple[str, ...]
    train_s: float
    samples: int
    """Shapes scenes rendered and encoded once, shared by both methods."""
    max_per_task: int
    """GenEval-lite prompts per (task, split); 0: all 120."""
    probe_steps: int
    grid_prompts: int = 8
    steps: tuple[int, ...] = (1, 2, 4, 8, 50)


PROFILES = {
    "gpu": StudyProfile("gpu", "benchmarks/configs/reproduce-gpu.toml",
                        ("--train.use_gpu=true", "--train.compile=false"), train_s=180.0, samples=20000,
                        max_per_task=0, probe_steps=24),
    # 32x32 pixels pooled to 16x16, tiny widths: proves the script, says nothing of quality.
    "cpu": StudyProfile("cpu", None, ("--model.width=64", "--model.head_dim=16", "--model.double_blocks=1",
                                      "--model.single_blocks=1", "--train.batch_size=16",
                                      "--train.use_gpu=false"),
                        train_s=12.0, samples=256, max_per_task=2, probe_steps=8, grid_prompts=4),
}


def study_config(profile: StudyProfile, method: str, steps: int, extra: list[str]):
    from selfe.config import load_config

    config = ROOT / profile.config if profile.config else None
    return load_config(config, overrides=[*profile.overrides, f"--objective.method={method}",
                                          f"--train.steps={steps}", *extra],
                       preset=None if config else "tiny")


def _train(cfg, rows, null, device: torch.device, steps: int, deadline: float | None):
    from selfe.bench.gpucheck_train import device_batches
    from selfe.train.local import train_local

    tokens = cfg.model.num_tokens(*rows["latent"].shape[-2:])
    batches = device_batches(rows, cfg.train.batch_size, cfg.train.seed, device)
    stop = (lambda: time.perf_counter() > deadline) if deadline else None  # noqa: E731
    t0 = time.perf_counter()
    model, ema, history = train_local(cfg, batches, null, tokens, steps=steps, device=str(device), stop=stop)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ema, history, time.perf_counter() - t0


def train_method(profile: StudyProfile, method: str, rows, null, device: torch.device, train_s: float,
                 extra: list[str]) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Probe the step time, then train ``train_s`` worth of steps. Returns (EMA model, config, facts)."""
    probe_cfg = study_config(profile, method, 10_000, extra)
    _, history, _ = _train(probe_cfg, rows, null, device, profile.probe_steps, None)
    timed = sorted(h["step_s"] for h in history[profile.probe_steps // 2:])  # after the warm-up half
    step_s = timed[len(timed) // 2]
    planned = max(int(train_s / step_s), 10)
    # The recipe's 1,000 warm-up steps are most of a few-minute run: warm up over 5% of it instead.
    warmup = [] if any(o.startswith("--optim.warmup_steps") for o in extra) else \
        [f"--optim.warmup_steps={max(planned // 20, 5)}"]
    cfg = study_config(profile, method, planned, [*warmup, *extra])
    ema, history, seconds = _train(cfg, rows, null, device, planned, time.perf_counter() + 1.15 * train_s)
    tail = history[-max(len(history) // 10, 1):]
    facts = {"probe_step_s": round(step_s, 4), "planned_steps": planned, "warmup_steps": cfg.optim.warmup_steps,
             "steps": len(history),
             "train_s": round(seconds, 1), "batch": cfg.train.batch_size,
             "images_per_s": round(len(history) * cfg.train.batch_size / seconds, 1),
             "params_M": round(sum(p.numel() for p in ema.parameters()) / 1e6, 1),
             "final_loss": round(sum(h["loss"] for h in tail) / len(tail), 4)}
    print(f"[gpu_study] {method}: {facts['steps']} steps in {facts['train_s']} s "
          f"({facts['images_per_s']} img/s, probe {step_s * 1e3:.1f} ms/step)", flush=True)
    return ema, cfg, facts


def score(cfg, ema, text, codec, device: torch.device, profile: StudyProfile, out: Path, method: str):
    """GenEval-lite at every step count (per-step sampler defaults) and the sample grid."""
    from selfe.eval.runner import evaluate_steps, progress_line, select_prompts
    from selfe.generator import ImageGenerator
    from selfe.tracking.images import grid_image, png_bytes

    records = select_prompts(cfg.eval.prompt_set, max_per_task=profile.max_per_task)
    gen = ImageGenerator(ema, cfg, text=text, codec=codec, device=device)
    results = evaluate_steps(gen, records, list(profile.steps), seed=cfg.eval.seed, batch_size=cfg.eval.batch_size,
                             on_result=lambda s, r: print(progress_line(f"[gpu_study] {method}", s, r), flush=True))
    prompts = [r["prompt"] for r in records]
    grid_prompts = prompts[:: max(len(prompts) // profile.grid_prompts, 1)][: profile.grid_prompts]
    grid = {s: gen.generate(grid_prompts, steps=s, seed=cfg.eval.seed)[0] for s in profile.steps}
    (out / f"grid_{method}.png").write_bytes(png_bytes(grid_image(grid), scale=2))
    rows = {s: {"overall": round(r["overall"], 4), "se": round(r["overall_se"], 4), "nfe": r["nfe"],
                "eta": gen.sampler(steps=s).eta, "prompts": r["num_images"]} for s, r in results.items()}
    return rows, grid_prompts


def render_markdown(report: dict[str, Any]) -> str:
    steps = report["steps"]
    lines = [f"# GPU study ({report['profile']} profile)", "", f"Device: {report['device']}", "",
             f"Each method trained {report['train_s']:g} s of wall time (step time probed first; the schedules "
             f"run over the planned steps); GenEval-lite over {report['prompts']} prompts, noise seed "
             f"{report['seed']}, each method's per-step sampler defaults (eta in brackets). ± is the binomial "
             "standard error over the prompts (one model, one training seed).", "",
             "| method | steps trained | img/s | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]
    for method, m in report["methods"].items():
        cells = [f"{m['scores'][str(s)]['overall']:.3f} ± {m['scores'][str(s)]['se']:.3f} "
                 f"(η {m['scores'][str(s)]['eta']:g})" for s in steps]
        lines.append(f"| {method} | {m['train']['steps']} | {m['train']['images_per_s']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Grids: `grid_self_e.png`, `grid_flow_matching.png` (rows: " + ", ".join(map(str, steps))
              + " steps; columns: " + "; ".join(report["grid_prompts"]) + ").", "",
              f"Total {report['total_s']:.0f} s (data {report['data_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=list(PROFILES), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-s", type=float, default=None, help="wall seconds of training per method")
    ap.add_argument("--out", default="outputs/gpu_study")
    ap.add_argument("overrides", nargs="*", help="config overrides for both methods, e.g. --optim.lr=2e-4")
    args, extra = ap.parse_known_args(argv)
    extra = [*args.overrides, *extra]
    profile, device = PROFILES[args.profile], torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_study: --device cuda but no CUDA device is visible; use --profile cpu --device cpu")
    train_s = args.train_s or profile.train_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from selfe.bench.gpucheck_train import encode_shapes
    from selfe.encoders.image import build_codec
    from selfe.encoders.text import TextEncoder

    cfg = study_config(profile, METHODS[0], 1000, extra)
    codec = build_codec(cfg.codec, device=device)
    text = TextEncoder(cfg.text, device=device)
    rows = encode_shapes(cfg, profile.samples, codec, text)
    null = text.encode([""])
    data_s = time.perf_counter() - t0
    print(f"[gpu_study] {profile.samples} scenes encoded in {data_s:.1f} s on {device_line(device)}", flush=True)
    methods, grid_prompts, prompts = {}, [], 0
    for method in METHODS:
        torch.manual_seed(0)
        ema, mcfg, facts = train_method(profile, method, rows, null, device, train_s, extra)
        scores, grid_prompts = score(mcfg, ema, text, codec, device, profile, out, method)
        prompts = next(iter(scores.values()))["prompts"]
        methods[method] = {"train": facts, "scores": {str(s): v for s, v in scores.items()}}
        del ema
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {"profile": profile.name, "device": device_line(device), "train_s": train_s, "steps": list(profile.steps),
              "prompts": prompts, "seed": cfg.eval.seed, "grid_prompts": grid_prompts, "data_s": round(data_s, 1),
              "methods": methods, "total_s": round(time.perf_counter() - t0, 1)}
    (out / "gpu_study.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_study.md").write_text(render_markdown(report))
    print(render_markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
