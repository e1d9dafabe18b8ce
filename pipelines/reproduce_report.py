"""The reproduction report: study results (``pipelines/reproduce.py``'s study.json) -> markdown + plots.

Evaluation keys are ``"{run}|{tag}|{steps}"`` with tag ``final``, ``ckpt{N}``, ``landing-{policy}``
or ``w{omega}-eta{eta}``; each value is a GenEval-lite summary (overall, per_task, heldout, nfe,
num_images). A run is ``{variant}@s{seed}`` (or a bare variant in one-seed studies); the report merges
the seeds of a variant: mean, its standard error (seeds' spread and evaluation sampling, ``merge_seeds``)
and the binomial error of the pooled images.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

START, END = "<!-- generated:start -->", "<!-- generated:end -->"
BASE, REFERENCE = "self_e", "flow_matching"


def run_variant(run: str) -> str:
    """"self_e" from "self_e@s1"; a run key without a seed is its variant."""
    return run.partition("@")[0]


def merge_seeds(summaries: list[dict]) -> dict:
    """One summary from a variant's seeds: the mean of overall, per_task and heldout, ``seeds``,
    ``se_seeds`` (standard error of the mean over seeds; None with one), ``se_binomial``
    (sqrt(p (1 - p) / n) over all the seeds' images) and ``se``, the error the claims allow.

    ``se`` has two parts. The seeds' spread says how much the mean moves with another training seed;
    it misses the evaluation's own sampling error, because every seed is scored on the same prompts
    and noise (an unlucky prompt draw is unlucky for all of them, and two seeds that happen to tie
    have a spread of 0). That part is the binomial error of one seed's evaluation, p (1 - p) / n with
    n its prompts. se = sqrt(se_seeds^2 + p (1 - p) / n); with one seed, the binomial error alone."""
    k, overall = len(summaries), [s["overall"] for s in summaries]
    mean = sum(overall) / k
    images = sum(s.get("num_images") or 0 for s in summaries)
    held = [s["heldout"] for s in summaries if s.get("heldout") is not None]
    return {**summaries[0], "overall": mean, "seeds": k,
            "per_task": {t: sum(s["per_task"][t] for s in summaries) / k for t in summaries[0]["per_task"]},
            "heldout": sum(held) / len(held) if held else None,
            "se_seeds": _se_of_mean(overall) if k > 1 else None,
            "se_binomial": math.sqrt(mean * (1 - mean) / images) if images else None,
            "se": math.hypot(_se_of_mean(overall) if k > 1 else 0.0,
                             math.sqrt(mean * (1 - mean) / (images / k)) if images else 0.0)}


def _se_of_mean(values: list[float]) -> float:
    """Standard error of the mean of independent draws (two or more)."""
    return statistics.stdev(values) / math.sqrt(len(values))


def merged_evals(data: dict) -> dict[tuple[str, str, str], dict]:
    """{(variant, tag, steps): the summary merged over the variant's seeds (``merge_seeds``)}."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for key, summary in data["evals"].items():
        run, tag, steps = key.split("|")
        groups.setdefault((run_variant(run), tag, steps), []).append(summary)
    return {k: merge_seeds(v) for k, v in groups.items()}


def _se(s: dict) -> float:
    """The error a claim allows: seeds' spread and evaluation sampling together (``merge_seeds``)."""
    return s.get("se") or 0.0


def _cell(ev: dict, variant: str, tag: str, steps) -> str:
    s = ev.get((variant, tag, str(steps)))
    if s is None:
        return "—"
    return f"{s['overall']:.3f}" + (f" ± {s['se']:.3f}" if s.get("seeds", 1) > 1 else "")


def _score(ev: dict, variant: str, tag: str, steps) -> float | None:
    s = ev.get((variant, tag, str(steps)))
    return None if s is None else s["overall"]


def _final_steps(ev: dict, variant: str) -> list[int]:
    return sorted(int(k[2]) for k in ev if k[0] == variant and k[1] == "final" and k[2].isdigit())


def _checkpoint_steps(ev: dict, variant: str) -> list[int]:
    return sorted({int(k[1][4:]) for k in ev if k[0] == variant and k[1].startswith("ckpt")})


def final_steps_of(runs: dict) -> dict[str, int]:
    """Training steps of each variant's final model (its first seed's run)."""
    out: dict[str, int] = {}
    for run, r in runs.items():
        out.setdefault(run_variant(run), r.get("final_step"))
    return out


def headline(ev: dict, labels: dict) -> str:
    steps = _final_steps(ev, BASE)
    rows = ["| sampling steps | NFE (Self-E / FM) | Self-E | flow matching | Self-E − FM | seeds | binomial SE (Self-E / FM) |",
            "|---|---|---|---|---|---|---|"]
    for n in steps:
        a, b = _score(ev, BASE, "final", n), _score(ev, REFERENCE, "final", n)
        ours, ref = ev[(BASE, "final", str(n))], ev.get((REFERENCE, "final", str(n)))
        nfe = f"{ours['nfe']} / " + (str(ref["nfe"]) if ref else "—")
        diff = "—" if a is None or b is None else f"{a - b:+.3f}"
        binom = " / ".join("—" if x is None or x.get("se_binomial") is None else f"{x['se_binomial']:.3f}" for x in (ours, ref))
        seeds = f"{ours['seeds']} / {ref['seeds'] if ref else '—'}"
        rows.append(f"| {n} | {nfe} | {_cell(ev, BASE, 'final', n)} | {_cell(ev, REFERENCE, 'final', n)} | {diff} | "
                    f"{seeds} | {binom} |")
    for variant in (BASE, REFERENCE):
        if (variant, "final", "untrained@4") in ev:
            rows.append(f"| untrained, 4 steps ({labels[variant][0]}) | | "
                        + ("" if variant != BASE else _cell(ev, BASE, "final", "untrained@4")) + " | "
                        + ("" if variant != REFERENCE else _cell(ev, REFERENCE, "final", "untrained@4")) + " | | | |")
    return "\n".join(rows)


def per_task(ev: dict, variant: str) -> str:
    finals = {n: ev[(variant, "final", str(n))] for n in _final_steps(ev, variant)}
    if not finals:
        return ""
    tasks = list(next(iter(finals.values()))["per_task"])
    rows = ["| steps | NFE | overall | " + " | ".join(tasks) + " | held-out |", "|" + "---|" * (len(tasks) + 4)]
    for n, s in finals.items():
        held = "—" if s.get("heldout") is None else f"{s['heldout']:.3f}"
        rows.append(f"| {n} | {s['nfe']} | {s['overall']:.3f} | " + " | ".join(f"{s['per_task'][t]:.3f}" for t in tasks)
                    + f" | {held} |")
    return "\n".join(rows)


def progress(ev: dict, variants: list[str], final_step: dict[str, int]) -> str:
    cols = [1, 2, 4, 8]
    rows = ["| method | training step | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in cols) + " |",
            "|---|---|" + "---|" * len(cols)]
    for v in variants:
        for step in _checkpoint_steps(ev, v):
            rows.append(f"| {v} | {step} | " + " | ".join(_cell(ev, v, f"ckpt{step}", n) for n in cols) + " |")
        if _final_steps(ev, v):
            rows.append(f"| {v} | {final_step.get(v, 'final')} | " + " | ".join(_cell(ev, v, "final", n) for n in cols)
                        + " |")
    return "\n".join(rows)


def ablations(ev: dict, variants: list[str], labels: dict) -> str:
    steps = _final_steps(ev, BASE)
    rows = ["| variant | " + " | ".join(f"{n}" for n in steps) + " |", "|---|" + "---|" * len(steps)]
    for v in variants:
        rows.append(f"| {labels[v][0]} | " + " | ".join(_cell(ev, v, "final", n) for n in steps) + " |")
    return "\n".join(rows)


def inference_table(ev: dict, prefix: str, default: str | None = None) -> str:
    """Rows: (variant, setting) for tags starting with ``prefix``; columns: step counts. With ``default``
    each variant's final scores join its rows as the setting ``default`` (the one they were taken with)."""
    tags = sorted({(k[0], k[1]) for k in ev if k[1].startswith(prefix)})
    steps = sorted({int(k[2]) for k in ev if k[1].startswith(prefix)})
    if not tags:
        return ""
    if default is not None:
        tags = sorted(tags + [(v, "final") for v in {v for v, _ in tags}])
    rows = ["| method | setting | " + " | ".join(str(n) for n in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for variant, tag in tags:
        name = f"{default} (default)" if tag == "final" else tag.removeprefix(prefix) if prefix != "w" else tag
        rows.append(f"| {variant} | {name} | " + " | ".join(_cell(ev, variant, tag, n) for n in steps) + " |")
    return "\n".join(rows)


def paired_table(evals: dict, prefixes: tuple[str, ...] = ("landing-", "w")) -> str:
    """Every inference setting scored on several seeds, as the mean ± SE over seeds of each seed's
    (setting − default) score: the same model and evaluation noise on both sides, so the seed-to-seed
    spread of the model cancels. Settings with one seed get no cell."""
    diffs: dict[tuple[str, str, str], list[float]] = {}
    for key, s in sorted(evals.items()):
        run, tag, n = key.split("|")
        default = evals.get(f"{run}|final|{n}")
        if tag.startswith(prefixes) and default is not None:
            diffs.setdefault((run_variant(run), tag, n), []).append(s["overall"] - default["overall"])
    cells = {k: d for k, d in diffs.items() if len(d) >= 2}
    if not cells:
        return ""
    steps = sorted({int(n) for _, _, n in cells})
    rows = ["| method | setting | seeds | " + " | ".join(str(n) for n in steps) + " |", "|---|---|---|" + "---|" * len(steps)]
    for v, tag in sorted({(v, tag) for v, tag, _ in cells}):
        got = [cells.get((v, tag, str(n))) for n in steps]
        rows.append(f"| {v} | {tag.removeprefix('landing-')} | {max(len(d) for d in got if d)} | " + " | ".join(
            "—" if d is None else f"{statistics.fmean(d):+.3f} ± {_se_of_mean(d):.3f}" for d in got) + " |")
    return "\n".join(rows)


def _diff_se(ev: dict, a: tuple[str, str, str], b: tuple[str, str, str]) -> float:
    """Standard error of the difference of two scores ((variant, tag, steps) keys; independent samples)."""
    return math.hypot(_se(ev[a]), _se(ev[b]))


def claims(ev: dict) -> list[str]:
    """The paper's claims (selfe-method.md section 5), each a yes/no computed from the study's numbers,
    which follow it. SE: the seeds' spread and the evaluation's sampling error together (``merge_seeds``). "At least
    level" claims allow 1 SE against them; "helps"/"hurts" claims need a gap beyond 1 SE."""
    out = []

    def verdict(text: str, ok: bool, detail: str) -> str:
        return f"{text}: **{'yes' if ok else 'no'}** ({detail})"

    def have(*keys) -> bool:
        return all(k in ev for k in keys)

    few = [(n, ratio) for n, ratio in ((1, 2.0), (2, 1.8)) if have((BASE, "final", str(n)), (REFERENCE, "final", str(n)))]
    if len(few) == 2:
        pairs = [(n, r, _score(ev, BASE, "final", n), _score(ev, REFERENCE, "final", n)) for n, r in few]
        out.append(verdict("Self-E ≥ 2× flow matching at 1 step and ≥ 1.8× at 2 steps",
                           all(a >= r * b and a > b for _, r, a, b in pairs),
                           "; ".join(f"{n} step{'s' * (n > 1)}: {a:.3f} vs {r:g} × {b:.3f}" for n, r, a, b in pairs)))
    both = [n for n in _final_steps(ev, BASE) if have((REFERENCE, "final", str(n)))]
    if both:
        rows = [(n, _score(ev, BASE, "final", n), _score(ev, REFERENCE, "final", n),
                 _diff_se(ev, (BASE, "final", str(n)), (REFERENCE, "final", str(n)))) for n in both]
        out.append(verdict("Self-E ≥ flow matching − 1 SE at every step count", all(a >= b - e for _, a, b, e in rows),
                           "; ".join(f"{n}: {a:.3f} vs {b:.3f} (SE of the difference {e:.3f})" for n, a, b, e in rows)))
    for variant, name, first in ((BASE, "Self-E", 1), (REFERENCE, "flow matching", 4)):
        seq = [n for n in _final_steps(ev, variant) if n >= first]
        if len(seq) > 1:
            drops = [(_score(ev, variant, "final", m), _score(ev, variant, "final", n),
                      _diff_se(ev, (variant, "final", str(m)), (variant, "final", str(n)))) for m, n in zip(seq, seq[1:])]
            out.append(verdict(f"{name} non-decreasing from {seq[0]} to {seq[-1]} steps within 1 SE",
                               all(b >= a - e for a, b, e in drops),
                               " → ".join(f"{_score(ev, variant, 'final', n):.3f}" for n in seq)
                               + "; largest allowed drop " + f"{max(e for *_, e in drops):.3f}"))
    lead = [(c, _score(ev, BASE, f"ckpt{c}", 2), _score(ev, REFERENCE, f"ckpt{c}", 2)) for c in _checkpoint_steps(ev, BASE)]
    lead = [x for x in lead if x[1] is not None and x[2] is not None]
    if lead:
        out.append(verdict("Lead at 2 steps at every checkpoint", all(a > b for _, a, b in lead),
                           "; ".join(f"step {c}: {a:.3f} vs {b:.3f}" for c, a, b in lead)))

    def mean_over(variant: str, steps: list[int]) -> tuple[float, float] | None:
        """(mean score over ``steps``, a bound on its SE). The step counts share a model and prompts, so
        their errors are positively correlated: the mean of their SEs (full correlation) bounds the SE."""
        rows = [ev.get((variant, "final", str(n))) for n in steps]
        if not rows or any(r is None for r in rows):
            return None
        return sum(r["overall"] for r in rows) / len(rows), sum(_se(r) for r in rows) / len(rows)

    def beats(text: str, better: tuple[float, float], worse: tuple[float, float], names: tuple[str, str],
              steps: list[int]) -> str:
        """A directional ablation claim reads yes only when the gap exceeds its standard error."""
        gap, err = better[0] - worse[0], math.hypot(better[1], worse[1])
        return verdict(text, gap > err, f"mean over {steps}: {names[0]} {better[0]:.3f} vs {names[1]} {worse[0]:.3f}, "
                       f"difference {gap:+.3f} ± {err:.3f}; yes needs it beyond 1 SE")

    all_steps = _final_steps(ev, BASE)
    high = [n for n in all_steps if n >= 4]
    nr, base_hi = mean_over("no_renorm", high), mean_over(BASE, high)
    if nr is not None and base_hi is not None:
        out.append(beats("Target renorm helps at ≥ 4 steps", base_hi, nr, ("Self-E", "no renorm"), high))
    fake, base = mean_over("fake_from_start", all_steps), mean_over(BASE, all_steps)
    if fake is not None and base is not None:
        out.append(beats("Fake-score term from step 0 hurts", base, fake, ("Self-E", "fake from step 0"), all_steps))
    return out


def plots(data: dict, out_dir: Path, labels: dict) -> list[str]:
    """quality_vs_steps.png and quality_vs_training.png in ``out_dir``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = merged_evals(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for v in labels:
        steps = _final_steps(ev, v)
        if steps:
            ax.plot(steps, [_score(ev, v, "final", n) for n in steps], marker="o", label=labels[v][0])
    ax.set_xscale("log")
    written.append(_save(plt, fig, ax, "sampling steps", "Quality vs sampling steps (final models)",
                         out_dir / "quality_vs_steps.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    final_step = final_steps_of(data["runs"])
    for v, style in ((BASE, "-"), (REFERENCE, "--")):
        for n in (1, 2, 4):
            xs = _checkpoint_steps(ev, v)
            ys = [_score(ev, v, f"ckpt{s}", n) for s in xs]
            if final_step.get(v) and _score(ev, v, "final", n) is not None:
                xs, ys = [*xs, final_step[v]], [*ys, _score(ev, v, "final", n)]
            if xs:
                ax.plot(xs, ys, style, marker="o", label=f"{labels[v][0]}, {n} step{'s' * (n > 1)}")
    written.append(_save(plt, fig, ax, "training step", "Quality vs training progress",
                         out_dir / "quality_vs_training.png"))
    return written


def _save(plt, fig, ax, xlabel: str, title: str, path: Path) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("GenEval-lite overall")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _load_line(runs: dict) -> str:
    """Whether the runs had the machine to themselves, as far as their start-time load averages say."""
    busy = [r["cpu_busy_before"] for r in runs.values() if r.get("cpu_busy_before") is not None]
    if not busy:
        return "whether the machine was otherwise idle is not recorded"
    return f"CPU busy in the 3 s before each run: {min(busy):.0%}–{max(busy):.0%}"


def missing_runs(data: dict) -> list[str]:
    """The planned runs (``variant@sN``) of a study that have not finished."""
    return [k for k in data.get("planned", []) if not data["runs"].get(k, {}).get("done")]


def _partial_line(data: dict) -> list[str]:
    """A study stopped part-way says which planned runs it still lacks (the next invocation resumes)."""
    missing = missing_runs(data)
    if not missing:
        return []
    done = [k for k in data.get("planned", []) if k not in missing]
    return [f"**Part-way**: {len(done)} of {len(data['planned'])} planned runs done ({', '.join(done) or 'none'}); "
            f"still to run: {', '.join(missing)}. Rerunning the command resumes the study.", ""]


def render(data: dict, labels: dict, figure_dir: str) -> str:
    ev = merged_evals(data)
    runs = data["runs"]
    final_step = final_steps_of(runs)
    variants = [v for v in labels if v in final_step]
    cfg = data.get("config", {}).get(BASE) or next(iter(data.get("config", {}).values()), {})
    hw = data.get("hardware", {})
    lines = [
        f"Budget **{data.get('budget')}**: {cfg.get('params', 0) / 1e6:.2f}M-parameter MM-DiT, "
        f"{cfg.get('resolution')}×{cfg.get('resolution')} shapes world, {cfg.get('steps')} steps at batch "
        f"{cfg.get('batch_size')}, GenEval-lite on {cfg.get('prompts')} prompts (evaluation seed fixed; same noise for "
        f"every method and training seed). Scores are means over training seeds ± their standard error where a "
        f"variant has several: the seeds' spread and the evaluation's sampling error (binomial over one seed's "
        f"prompts; every seed is scored on the same prompts) together, the error the claims allow. Hardware: {hw.get('gpu') or hw.get('cpu')} ({hw.get('cores')} cores), torch "
        f"{hw.get('torch')}; {_load_line(runs)}.",
        "", f"Regenerate: `{data.get('command', 'python pipelines/reproduce.py')}`", "", *_partial_line(data),
        "### Headline: GenEval-lite overall, final models", "", headline(ev, labels), "",
        "### The paper's claims, checked", "", *[f"- {c}" for c in claims(ev)], "",
        f"![quality vs steps]({figure_dir}/quality_vs_steps.png) ![quality vs training]({figure_dir}/quality_vs_training.png)",
        "", *[f"Samples, {labels[v][0]} (first seed; rows 1 / 2 / 4 / 8 / 50 steps): ![{v}]({rel})"
               for v, rel in data.get("grids", {}).items()],
        "", "### Quality vs training progress (GenEval-lite overall)", "",
        progress(ev, [v for v in (BASE, REFERENCE) if v in final_step], final_step), "",
        "### Training ablations (same budget; overall at each step count)", "", ablations(ev, variants, labels), "",
        "### Inference ablation: landing time s (final models)", "", inference_table(ev, "landing-", cfg.get("landing", "?")), "",
        f"### Inference diagnostics: guidance ω and DDIM η (the final scores use ω = {cfg.get('guidance', '?')}, "
        f"η = {cfg.get('eta', '?')})", "", inference_table(ev, "w"), "",
    ]
    table = paired_table(data["evals"])
    if table:
        lines += ["### Inference settings against the default, paired by training seed", "",
                  "Each seed's score with the setting minus the same model's default score (same prompts and "
                  "noise), mean ± SE over the seeds: the model-to-model spread cancels.", "", table, ""]
    for v in variants:
        lines += [f"### Per task: {labels[v][0]} (final)", "", per_task(ev, v), ""]
    lines += ["### Wall times", "", "| run (variant@seed) | training (s) | whole job (s) | MLflow run | registered |",
              "|---|---|---|---|---|"]
    for run, r in runs.items():
        lines.append(f"| {run} | {r['train_s']:.0f} | {r['job_s']:.0f} | {r.get('mlflow_run_id') or '—'} | "
                     f"selfe-reproduce v{r.get('model_version')} |")
    evals_s = sum(s.get("eval_s", 0) for s in data["evals"].values())
    lines += ["", f"Evaluation outside the jobs (checkpoints and inference ablations): {evals_s:.0f} s."]
    for key, wall in data.get("wall_s", {}).items():
        lines.append(f"Study wall time for `{key}`: {wall} s (summed over the invocations that ended normally).")
    return "\n".join(lines)


def write_report(data: dict, path: Path, labels: dict) -> None:
    """Regenerate the section between the markers of ``path`` (created with them if missing); the
    figures go to ``<path's folder>/results/``."""
    figure_dir = "results"
    plots(data, path.parent / figure_dir, labels)
    body = f"{START}\n{render(data, labels, figure_dir)}\n{END}"
    text = path.read_text() if path.exists() else f"# Results\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    path.write_text(text)
