"""Reproduce the paper's claims at small scale: Self-E vs flow matching, ablations, landing policy.

    python pipelines/reproduce.py                      # CPU budget: tiny model, 12000 steps per run (~50 min each
                                                       # on 2 cores): several invocations, each resumes
    python pipelines/reproduce.py --budget gpu         # 64x64, 71M parameters, one GPU
    python pipelines/reproduce.py --variants self_e,flow_matching --seeds 0 --train.steps=400

Every variant is trained by the real job (``selfe.train.job.run_training``: Ray Train, MLflow run,
registered model) with the same model, data, step count and batch; only the objective differs. Self-E
and flow matching run once per training seed (``--seeds``, default 0,1,2); the ablations run with the
first seed. Each kept checkpoint is scored with GenEval-lite at 1/2/4/8 steps, the final model at
1/2/4/8/50; the final models also under the inference ablations: the landing policies (every Self-E
seed and the small-gap ablation), guidance and eta (the first seed; DDIM at the default guidance on
every seed). Results accumulate in ``<out>/<budget>/study.json``: a rerun skips what is done and
resumes an interrupted training run. ``docs/results.md`` is regenerated between its ``generated``
markers; text outside them is kept. Run it alone on the machine: each run records how busy the CPU
was in the 3 s before it started, and the report shows the range.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from selfe.cli import OneLineParser, fail, unwritable
from selfe.config import load_config
from selfe.core.sampling import STEP_ETA, resolve_landing
from selfe.configtools import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study's report module lives beside this script
from reproduce_report import run_variant  # noqa: E402
BUDGETS = {
    # The recipe's study budget (docs/recipe.md): flow matching reached 0.62-0.70 at 50 steps after 14000
    # plain-loop steps at batch 16 in 45 minutes with compiled blocks; the Ray job runs ~15% slower on 2 cores.
    "cpu": {"config": None, "overrides": ["--train.steps=12000", "--train.checkpoint_every=3000",
                                          "--train.compile=true"]},
    "gpu": {"config": ROOT / "benchmarks" / "configs" / "reproduce-gpu.toml", "overrides": []},
}
VARIANTS = {
    "self_e": ("Self-E", []),
    # Flow matching samples with s = t: the sampler's "auto" landing follows the method.
    "flow_matching": ("flow matching", ["--objective.method=flow_matching"]),
    "no_renorm": ("Self-E without target renorm", ["--objective.renorm_target=false"]),
    "fake_from_start": ("Self-E + fake-score term from step 0", ["--objective.fake_score=true",
                                                                "--objective.aux_start_step=0"]),
    # Investigation: tau reaches 1 only at the last step (default: 42% of the run, the paper's ratio).
    "long_horizon": ("Self-E, tau horizon = whole run", ["--anneal_fraction=1.0"]),
    # The training-side remedy for many-step sampling [ours]: a quarter of the s < t draws have gaps <= 0.05.
    "small_gap": ("Self-E + small-gap share 0.25", ["--objective.small_gap_share=0.25"]),
}
STUDY = ("self_e", "flow_matching", "no_renorm", "fake_from_start", "small_gap")
"""The default --variants: issue 13's study. long_horizon is an investigation, run on request."""
SEEDED = ("self_e", "flow_matching")
"""Variants trained once per --seeds entry; the others (ablations) with the first seed only."""
CHECKPOINT_STEPS = [1, 2, 4, 8]
FINAL_STEPS = [1, 2, 4, 8, 50]
# Self-E's landing policies at every step count ("next" is its default: the final scores), for every
# seed of the paper's training (the CPU default is chosen from them: mean and SE over seeds) and for the
# small-gap remedy (meant to make "next" hold up at 50 steps).
LANDING = ("current", "midpoint", "hybrid")
LANDED = ("self_e", "small_gap")
DIAGNOSED = ("self_e", "flow_matching")


def sampler_diagnostics(cfg, full_grid: bool = True) -> list[tuple[float, float]]:
    """(guidance omega, eta) beside the config's own (the final scores; eta None: the per-step defaults
    of ``selfe.core.sampling.STEP_ETA``): what the method leaves to inference. Every seed: eta = 1 and
    deterministic DDIM (eta = 0) at the default guidance, paired over seeds against the per-step defaults
    (eta = 1 at every step count is the default the study ran with before them). ``full_grid`` (the first
    seed) adds other guidances at eta = 1 and DDIM at 5 (the default before docs/recipe.md moved it)."""
    omega0 = cfg.sampler.guidance
    paired = [(omega0, 1.0), (omega0, 0.0)]
    grid = [(w, 1.0) for w in (1.0, 3.0, 5.0)] + paired + [(5.0, 0.0)] if full_grid else paired
    return [g for g in dict.fromkeys(grid) if g != (omega0, cfg.sampler.eta)]


class Study:
    """study.json: {"runs": {variant: {...}}, "evals": {key: summary}} — written after every result."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"runs": {}, "evals": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def run_key(variant: str, seed: int) -> str:
    return f"{variant}@s{seed}"


def variant_config(budget: str, variant: str, extra: list[str], seed: int, out: Path):
    b = BUDGETS[budget]
    name = f"{variant.replace('_', '-')}-s{seed}"
    # Checkpoints live with the study's state: a study under another --out (a smoke run) never resumes them.
    overrides = [*b["overrides"], f"--train.storage_path={out / budget / 'ray_results'}",
                 "--eval.max_prompts=20", "--tracking.experiment=selfe-reproduce",
                 "--tracking.registered_model=selfe-reproduce", f"--tracking.alias={budget}-{name}",
                 *VARIANTS[variant][1], f"--train.seed={seed}", *extra]  # the command line's overrides win
    cfg = load_config(b["config"], overrides)
    cfg.eval.steps = list(FINAL_STEPS)
    cfg.train.run_name = f"repro-{budget}-{name}"
    # Keep every checkpoint: each one is evaluated (quality vs training progress).
    cfg.train.keep_checkpoints = cfg.train.steps // cfg.train.checkpoint_every + 1
    return cfg


def train(study: Study, variant: str, cfg, out: Path) -> dict:
    from selfe.train.job import run_training

    run = study.data["runs"].get(variant)
    if run and run.get("done"):
        return run
    busy = cpu_busy()
    t0 = time.time()
    res = run_training(cfg, out_root=str(out))
    run = {"run_name": res.run_name, "mlflow_run_id": res.mlflow_run_id, "model_dir": res.model_dir,
           "model_version": res.model_version, "final_step": res.final_step, "train_s": res.train_seconds,
           "job_s": time.time() - t0, "grid": res.grid_path, "cpu_busy_before": busy, "done": True,
           "sampler_defaults": sampler_defaults(cfg)}
    study.data["runs"][variant] = run
    for steps, summary in res.geneval.items():  # the job's own final evaluation: steps 1/2/4/8/50 + untrained
        study.data["evals"][f"{variant}|final|{steps}"] = summary
    study.save()
    return run


def sampler_defaults(cfg) -> list:
    """What the "final" scores of a run sample with: the explicit eta, or the per-step eta table of the
    run's method (``STEP_ETA``) as JSON holds it."""
    if cfg.sampler.eta is not None:
        return [[0, cfg.sampler.eta]]
    return [list(row) for row in STEP_ETA["flow_matching" if cfg.objective.method == "flow_matching" else "self_e"]]


def cpu_busy(seconds: float = 3.0) -> float | None:
    """Share of the machine's CPU time busy over ``seconds`` (Linux /proc/stat), taken just before a run:
    near 0 when nothing else runs. None where /proc/stat is missing."""
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # (idle + iowait, all)

    try:
        idle0, total0 = read()
        time.sleep(seconds)
        idle1, total1 = read()
    except OSError:
        return None
    return round(1 - (idle1 - idle0) / max(total1 - total0, 1), 3)


def checkpoints(cfg) -> list[Path]:
    root = Path(cfg.train.storage_path) / cfg.train.run_name
    return sorted(p for p in root.glob("checkpoint_*") if p.is_dir())


def evaluate(study: Study, key: str, gen, records: list[dict], steps: int, cfg, logger=None, metric_step: int = 0,
             prefix: str = "", **sampler_kw) -> dict:
    from selfe.eval.metrics import overall_metric
    from selfe.eval.runner import evaluate_steps

    if key in study.data["evals"]:
        return study.data["evals"][key]
    t0 = time.time()
    summary = evaluate_steps(gen, records, [steps], seed=cfg.eval.seed, batch_size=cfg.eval.batch_size,
                             **sampler_kw)[steps]
    summary["eval_s"] = round(time.time() - t0, 1)
    study.data["evals"][key] = summary
    study.save()
    if logger is not None:
        logger.log_metrics({overall_metric(steps, prefix): summary["overall"]}, metric_step)
    print(f"[reproduce] {key}: overall {summary['overall']:.3f} ({summary['eval_s']} s)", flush=True)
    return summary


def evaluate_variant(study: Study, variant: str, cfg, run: dict, out: Path, first_seed: int) -> None:
    """Checkpoints and final model of one run (``variant`` is its run key, ``{variant}@s{seed}``)."""
    from ray.train import Checkpoint

    from selfe.encoders.text import TextEncoder
    from selfe.eval.runner import select_prompts
    from selfe.generator import ImageGenerator, load_generator
    from selfe.tracking.runlog import RunLogger
    from selfe.train.job import export_model

    records = select_prompts(cfg.eval.prompt_set, cfg.eval.max_prompts)
    logger = RunLogger(run["mlflow_run_id"]) if run.get("mlflow_run_id") else None
    text = TextEncoder(cfg.text)
    for path in checkpoints(cfg):
        model_dir = out / cfg.train.run_name / "checkpoints" / path.name
        info = model_dir / "model_info.json"
        if info.exists():  # exported by an earlier invocation: skip the reload when every score is cached
            step = json.loads(info.read_text())["step"]
            if step >= run["final_step"] or all(f"{variant}|ckpt{step}|{n}" in study.data["evals"]
                                                for n in CHECKPOINT_STEPS):
                continue
        model, step = export_model(cfg, Checkpoint(str(path.resolve())), model_dir)
        if step >= run["final_step"]:
            continue  # the final model is scored by the job itself
        gen = ImageGenerator(model, cfg, text=text)
        for steps in CHECKPOINT_STEPS:
            evaluate(study, f"{variant}|ckpt{step}|{steps}", gen, records, steps, cfg, logger, step, "ckpt_")
    final = load_generator(run["model_dir"])
    if run.get("sampler_defaults") != sampler_defaults(cfg):
        # The per-step defaults moved since the job scored its final model (a run without the record
        # predates them: eta = 1 everywhere): score it again, so that every seed's "final" row samples
        # the same way. The old defaults stay in the w{omega}-eta{eta} rows.
        for steps in FINAL_STEPS:
            study.data["evals"].pop(f"{variant}|final|{steps}", None)
            evaluate(study, f"{variant}|final|{steps}", final, records, steps, cfg)
        run["sampler_defaults"] = sampler_defaults(cfg)
        study.save()
    if run_variant(variant) in LANDED:  # a flow-matching model never saw s < t
        for policy in LANDING:
            for steps in FINAL_STEPS:
                evaluate(study, f"{variant}|landing-{policy}|{steps}", final, records, steps, cfg, logger,
                         prefix=f"landing_{policy}_", landing=policy)
    if run_variant(variant) in DIAGNOSED:
        for omega, eta in sampler_diagnostics(cfg, variant == run_key(run_variant(variant), first_seed)):
            for steps in FINAL_STEPS:
                evaluate(study, f"{variant}|w{omega:g}-eta{eta:g}|{steps}", final, records, steps, cfg, logger,
                         prefix=f"w{omega:g}_eta{eta:g}_", guidance=omega, eta=eta)
    if logger is not None:
        logger.close()


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    ap.add_argument("--variants", default=",".join(STUDY), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2", help=f"training seeds of {' and '.join(SEEDED)}; ablations use the first")
    ap.add_argument("--out", default="outputs/reproduce", help="folder for models, eval files and study.json")
    ap.add_argument("--report", default=str(ROOT / "docs" / "results.md"), help="markdown report to (re)generate")
    ap.add_argument("--report-only", action="store_true",
                    help="regenerate the report from study.json as it stands (a study part-way: says what is missing)")
    ap.add_argument("--max-runs", type=int, default=None,
                    help="train at most this many unfinished runs, then write the report part-way (a 2-core study "
                         "in chunks between other work; rerun to go on)")
    args, extra = ap.parse_known_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        return fail(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.max_runs is not None and args.max_runs < 1:
        return fail(f"--max-runs must be at least 1, got {args.max_runs}")
    try:  # every config is resolved (and validated) before any training starts
        parts = [x.strip() for x in args.seeds.split(",") if x.strip()]
        if not parts or not all(x.isdigit() for x in parts):
            raise ConfigError(f"--seeds must be comma-separated non-negative integers, e.g. 0,1,2; got {args.seeds!r}")
        seeds = [int(x) for x in parts]
        # Seed by seed (Self-E and flow matching of one seed side by side), then the ablations: a study
        # stopped part-way still holds matched pairs.
        order = [(v, seed) for seed in seeds for v in variants if v in SEEDED]
        order += [(v, seeds[0]) for v in variants if v not in SEEDED]
        configs = {run_key(v, seed): variant_config(args.budget, v, extra, seed, Path(args.out))
                   for v, seed in order}
    except ConfigError as e:
        return fail(str(e))
    for folder, setting in ((args.out, "--out"), (str(Path(args.report).parent), "--report (its folder)")):
        if problem := unwritable(folder, setting):
            return fail(problem)
    out = Path(args.out) / args.budget
    study = Study(out / "study.json")
    study.data["budget"] = args.budget
    study.data["hardware"] = hardware()
    shown, skip = [], False  # the command that regenerates the whole study: without --variants or --max-runs
    for a in argv if argv is not None else sys.argv[1:]:
        if not skip and not a.startswith(("--variants", "--max-runs")):
            shown.append(a)
        skip = a in ("--variants", "--max-runs")
    if not args.report_only:  # the report names the command that ran the study, not this one
        study.data["command"] = " ".join(["python pipelines/reproduce.py", *shown])
    study.data.setdefault("config", {}).update({run_variant(k): config_summary(c) for k, c in configs.items()})
    study.data["planned"] = list(configs)
    if args.report_only:
        return report(study, seeds[0], Path(args.report))
    t0, trained = time.time(), 0
    for key, cfg in configs.items():
        fresh = not (study.data["runs"].get(key) or {}).get("done")
        if fresh and args.max_runs is not None and trained >= args.max_runs:
            break  # the rest waits for the next invocation
        trained += fresh
        run = train(study, key, cfg, out)
        evaluate_variant(study, key, cfg, run, out, seeds[0])
    walls, key = study.data.setdefault("wall_s", {}), wall_key(variants)  # summed over the invocations that ended
    walls[key] = walls.get(key, 0) + round(time.time() - t0)
    return report(study, seeds[0], Path(args.report))


def config_summary(cfg) -> dict:
    """What the report states about a variant's run: size, budget, prompts and the sampler of its scores."""
    return {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "params": _params(cfg),
            "resolution": cfg.data.resolution, "prompts": len(_records(cfg)), "guidance": cfg.sampler.guidance,
            "eta": "per step" if cfg.sampler.eta is None else cfg.sampler.eta,
            "landing": resolve_landing(cfg.sampler.landing, cfg.objective.method)}


def wall_key(variants: list[str]) -> str:
    """The study's wall-time key: its set of variants in VARIANTS' order, so a study resumed with its
    runs reordered (``--variants small_gap,no_renorm,...``) keeps adding to the same total."""
    return ",".join(v for v in VARIANTS if v in variants)


def report(study: Study, first_seed: int, path: Path) -> int:
    from reproduce_report import missing_runs, write_report

    study.data["grids"] = copy_grids(study, first_seed, path.parent)
    study.save()
    write_report(study.data, path, VARIANTS)
    missing = missing_runs(study.data)
    print(f"\n=== reproduction {'part-way: ' + ', '.join(missing) + ' still to run' if missing else 'finished'}: "
          f"{study.path}, report {path} ===")
    return 0


def copy_grids(study: Study, seed: int, report_dir: Path) -> dict[str, str]:
    """The first seed's final sample grid of Self-E and flow matching (rows = step counts, same prompts
    and noise) next to the report, as ``results/grid_<variant>.png``; returns {variant: relative path}."""
    import shutil

    out = {}
    for variant in SEEDED:
        grid = (study.data["runs"].get(run_key(variant, seed)) or {}).get("grid")
        if grid and Path(grid).exists():
            rel = f"results/grid_{variant}.png"
            (report_dir / "results").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, report_dir / rel)
            out[variant] = rel
    return out


def _params(cfg) -> int:
    from selfe.core.model import build_model

    return sum(p.numel() for p in build_model(cfg.model, "meta").parameters())


def _records(cfg) -> list[dict]:
    from selfe.eval.runner import select_prompts

    return select_prompts(cfg.eval.prompt_set, cfg.eval.max_prompts)


def hardware() -> dict:
    import os

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    sys.exit(main())
