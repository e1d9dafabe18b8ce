"""One command for a GPU: step time, MFU, compile, checkpointing, memory, sampling latency and a short
Self-E training with GenEval-lite, as one JSON + Markdown report.

    python benchmarks/gpu_check.py                      # the GPU profile on cuda (CPU smoke profile without one)
    python benchmarks/gpu_check.py --profile cpu        # the smoke run: tiny widths, fp32, well under 2 minutes
    python benchmarks/gpu_check.py --blocks 8,16        # the full 0.5b depth instead of 2 double + 4 single

Sections, in the order they run (each timed; a failing one records its error and the next runs; a
section that would start after ``--budget-s`` is spent is skipped with a note; compilation, the one
cost not known in advance, runs late so that it cannot crowd out the rest):

1. throughput: images/s, model TFLOP/s and MFU of Self-E and flow matching (GPU: the ``0.5b`` widths,
   width 1024, head_dim 64, 2 double + 4 single blocks, bf16, 64x64x16 latents with 2x2 patches = 1,024
   image tokens + 64 text tokens, batch 32);
2. method_ratio: Self-E / flow-matching step time;
3. checkpointing: activation checkpointing off vs on, step time and memory;
4. fsdp: Self-E under FSDP2 on a one-rank process group (bf16 via MixedPrecisionPolicy) vs unsharded;
5. sampling: latency at 1/2/4/8/50 steps;
6. train_shapes: 300 Self-E steps on the 64x64 shapes world with the plain loop, GenEval-lite at
   1/2/4/8 steps;
7. compile: eager vs compiled blocks, compile time and steady step time;
8. production: Self-E and flow matching compiled under one-rank FSDP2 (how the GPU presets train): MFU
   of each and their step ratio;
9. memory: peak memory (``torch.cuda.max_memory_allocated``) of every configuration above.

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from selfe.bench.gpucheck import (CPU, GPU, Checker, StepBench, checkpointing_cost, compile_speed, device_info,
                            fsdp_cost, memory_table, method_ratio, production, sampling_latency, throughput)

SECTIONS = ("throughput", "method_ratio", "checkpointing", "fsdp", "sampling", "train_shapes", "compile", "production",
            "memory")


def run_check(profile, device: torch.device, budget_s: float, bench_overrides: list[str],
              train_overrides: list[str], sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """``sections`` (all by default) under one budget; returns the report (see ``render_markdown``)."""
    from selfe.bench.gpucheck_train import train_and_score

    checker = Checker(budget_s, device)
    bench = StepBench(profile, device, bench_overrides)
    steps = {"throughput": lambda: throughput(bench), "method_ratio": lambda: method_ratio(bench),
             "compile": lambda: compile_speed(bench), "checkpointing": lambda: checkpointing_cost(bench),
             "fsdp": lambda: fsdp_cost(bench), "production": lambda: production(bench),
             "memory": lambda: memory_table(bench), "sampling": lambda: sampling_latency(bench),
             # Training stops at 60% of the budget at the latest: GenEval-lite and compile come after it.
             "train_shapes": lambda: train_and_score(
                 profile, device, checker.start + 0.6 * budget_s, train_overrides)}
    for name in (n for n in SECTIONS if n in sections):
        checker.run(name, steps[name])
        print(f"[gpu_check] {name}: {checker.sections[name]['status']} "
              f"({checker.sections[name]['seconds']:.1f} s)", flush=True)
    return {"device": device_info(device), "profile": profile.name, "dtype": profile.dtype,
            "budget_s": budget_s, "total_s": round(time.perf_counter() - checker.start, 2),
            "sections": checker.sections}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the device line, then per section its status, time, scalars and table.
    Reading the numbers: step_s is the median optimiser step (s) after warm-up; images_per_s the batch
    over it; model_tflops_per_s the model FLOPs per second; mfu that over the device's dense peak
    (n/a where unknown); peak_mem_gib ``torch.cuda.max_memory_allocated``; saved_mib the activations
    autograd keeps for backward; ms_per_batch the median sampling time of one batch."""
    lines = [f"# GPU check ({report['profile']} profile, {report['dtype']})", "",
             f"Device: {report['device']['line']}  ", f"Total: {report['total_s']:.1f} s of a "
             f"{report['budget_s']:g} s budget", ""]
    for name, entry in report["sections"].items():
        lines += [f"## {name}: {entry['status']} ({entry['seconds']:.1f} s)", ""]
        if entry["status"] != "ok":
            lines += [f"{entry.get('error') or entry.get('note')}", ""]
            continue
        result = entry["result"]
        scalars = {k: v for k, v in result.items() if k != "rows" and not isinstance(v, dict)}
        lines += [f"- {k}: {_cell(v)}" for k, v in scalars.items()]
        lines += [f"- {k}: " + ", ".join(f"{a}={_cell(b)}" for a, b in v.items())
                  for k, v in result.items() if isinstance(v, dict)]
        if result.get("rows"):
            lines += ["", *_table(result["rows"])]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda when visible)")
    ap.add_argument("--profile", choices=["auto", "gpu", "cpu"], default="auto",
                    help="sizes to run: gpu (0.5b widths, bf16) or cpu (tiny smoke run); auto follows the device")
    ap.add_argument("--budget-s", type=float, default=None, help="global time budget (default: the profile's)")
    ap.add_argument("--blocks", default=None,
                    help="double,single blocks of the step-time and sampling model, e.g. 8,16")
    ap.add_argument("--batch", type=int, default=None, help="batch of the step-time sections")
    ap.add_argument("--train-steps", type=int, default=None, help="train_shapes' training steps")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend of the compile section")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated subset to run, e.g. production,memory (default: all, in the listed order)")
    ap.add_argument("--out", default="outputs/gpu_check")
    args, extra = ap.parse_known_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown --sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args, extra


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check and write ``gpu_check.json`` and ``gpu_check.md`` under ``--out``. Extra
    ``--section.field=value`` overrides go to the step-time and sampling model's config; prefix them with
    ``train:`` (``train:--model.width=128``) for train_shapes'."""
    args, extra = parse_args(argv)
    from selfe.generator import resolve_device

    device = resolve_device(args.device)
    profile = {"gpu": GPU, "cpu": CPU}.get(args.profile) or (GPU if device.type == "cuda" else CPU)
    if args.blocks:
        double, single = (int(b) for b in args.blocks.split(","))
        profile = replace(profile, overrides=[*profile.overrides, f"--model.double_blocks={double}",
                                              f"--model.single_blocks={single}"])
    changes = {"batch": args.batch, "train_steps": args.train_steps, "compile_backend": args.compile_backend}
    profile = replace(profile, **{k: v for k, v in changes.items() if v is not None})
    train_overrides = [o.removeprefix("train:") for o in extra if o.startswith("train:")]
    bench_overrides = [o for o in extra if not o.startswith("train:")]
    report = run_check(profile, device, args.budget_s or profile.budget_s, bench_overrides, train_overrides,
                       tuple(args.sections.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(render_markdown(report))
    print(f"[gpu_check] {report['device']['line']}: {report['total_s']:.1f} s; report in {out}/gpu_check.md")
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1)
