"""The reproduction report: study results (``pipelines/reproduce.py``'s study.json) -> markdown + plots.

Evaluation keys are ``"{variant}|{tag}|{steps}"`` with tag ``final``, ``ckpt{N}``, ``landing-{policy}``
or ``w{omega}-eta{eta}``; each value is a GenEval-lite summary (overall, per_task, heldout, nfe).
"""

from __future__ import annotations

import re
from pathlib import Path

START, END = "<!-- generated:start -->", "<!-- generated:end -->"
BASE, REFERENCE = "self_e", "flow_matching"


def _evals(data: dict) -> dict[tuple[str, str, str], dict]:
    return {tuple(k.split("|")): v for k, v in data["evals"].items()}


def _cell(ev: dict, variant: str, tag: str, steps) -> str:
    s = ev.get((variant, tag, str(steps)))
    return "—" if s is None else f"{s['overall']:.3f}"


def _score(ev: dict, variant: str, tag: str, steps) -> float | None:
    s = ev.get((variant, tag, str(steps)))
    return None if s is None else s["overall"]


def _final_steps(ev: dict, variant: str) -> list[int]:
    return sorted(int(k[2]) for k in ev if k[0] == variant and k[1] == "final" and k[2].isdigit())


def _checkpoint_steps(ev: dict, variant: str) -> list[int]:
    return sorted({int(k[1][4:]) for k in ev if k[0] == variant and k[1].startswith("ckpt")})


def headline(ev: dict, labels: dict) -> str:
    steps = _final_steps(ev, BASE)
    rows = ["| sampling steps | NFE (Self-E / FM) | Self-E | flow matching | Self-E − FM |", "|---|---|---|---|---|"]
    for n in steps:
        a, b = _score(ev, BASE, "final", n), _score(ev, REFERENCE, "final", n)
        nfe = f"{ev[(BASE, 'final', str(n))]['nfe']} / " + (str(ev[(REFERENCE, 'final', str(n))]["nfe"])
                                                              if (REFERENCE, "final", str(n)) in ev else "—")
        diff = "—" if a is None or b is None else f"{a - b:+.3f}"
        rows.append(f"| {n} | {nfe} | {_cell(ev, BASE, 'final', n)} | {_cell(ev, REFERENCE, 'final', n)} | {diff} |")
    for variant in (BASE, REFERENCE):
        if (variant, "final", "untrained@4") in ev:
            rows.append(f"| untrained, 4 steps ({labels[variant][0]}) | | "
                        + ("" if variant != BASE else _cell(ev, BASE, "final", "untrained@4")) + " | "
                        + ("" if variant != REFERENCE else _cell(ev, REFERENCE, "final", "untrained@4")) + " | |")
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


def inference_table(ev: dict, prefix: str) -> str:
    """Rows: (variant, setting) for tags starting with ``prefix``; columns: step counts."""
    tags = sorted({(k[0], k[1]) for k in ev if k[1].startswith(prefix)})
    steps = sorted({int(k[2]) for k in ev if k[1].startswith(prefix)})
    if not tags:
        return ""
    rows = ["| method | setting | " + " | ".join(str(n) for n in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for variant, tag in tags:
        rows.append(f"| {variant} | {tag.removeprefix(prefix) if prefix != 'w' else tag} | "
                    + " | ".join(_cell(ev, variant, tag, n) for n in steps) + " |")
    return "\n".join(rows)


def claims(ev: dict) -> list[str]:
    """The paper's claims (selfe-method.md section 5), each checked on the study's numbers."""
    out = []

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    few = [(n, _score(ev, BASE, "final", n), _score(ev, REFERENCE, "final", n)) for n in (1, 2)]
    if all(a is not None and b is not None for _, a, b in few):
        ok = all(a > b for _, a, b in few)
        out.append(f"Self-E ahead of flow matching at 1–2 steps: **{'yes' if ok else 'no'}** ("
                   + "; ".join(f"{n} step{'s' * (n > 1)}: {a:.3f} vs {b:.3f}" for n, a, b in few) + ")")
    many = [(n, _score(ev, BASE, "final", n), _score(ev, REFERENCE, "final", n)) for n in (8, 50)]
    if all(a is not None and b is not None for _, a, b in many):
        ok = all(a >= b for _, a, b in many)
        out.append(f"Self-E at least level at 8–50 steps: **{'yes' if ok else 'no'}** ("
                   + "; ".join(f"{n} steps: {a:.3f} vs {b:.3f}" for n, a, b in many) + ")")
    seq = [(n, _score(ev, BASE, "final", n)) for n in _final_steps(ev, BASE)]
    if seq:
        ok = all(b[1] >= a[1] for a, b in zip(seq, seq[1:]))
        out.append(f"Self-E monotonic in steps: **{'yes' if ok else 'no'}** ("
                   + " → ".join(f"{v:.3f}" for _, v in seq) + ")")
    lead = [(s, _score(ev, BASE, f"ckpt{s}", 2), _score(ev, REFERENCE, f"ckpt{s}", 2)) for s in _checkpoint_steps(ev, BASE)]
    lead = [x for x in lead if x[1] is not None and x[2] is not None]
    if lead:
        ok = all(a > b for _, a, b in lead)
        out.append(f"Lead at 2 steps holds at every checkpoint: **{'yes' if ok else 'no'}** ("
                   + "; ".join(f"step {s}: {a:.3f} vs {b:.3f}" for s, a, b in lead) + ")")

    def mean_over(variant: str, steps: list[int]) -> float | None:
        vals = [_score(ev, variant, "final", n) for n in steps]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    all_steps = _final_steps(ev, BASE)
    fake, base = mean_over("fake_from_start", all_steps), mean_over(BASE, all_steps)
    if fake is not None and base is not None:
        out.append(f"Fake-score term from the start hurts: **{'yes' if fake < base else 'no'}** (mean over steps "
                   f"{f(fake)} vs Self-E {f(base)})")
    high = [n for n in all_steps if n >= 4]
    nr, base_hi = mean_over("no_renorm", high), mean_over(BASE, high)
    if nr is not None and base_hi is not None:
        out.append(f"Target renorm helps at ≥ 4 steps: **{'yes' if base_hi > nr else 'no'}** (mean over "
                   f"{high}: Self-E {f(base_hi)} vs no renorm {f(nr)})")
    return out


def plots(data: dict, out_dir: Path, labels: dict) -> list[str]:
    """quality_vs_steps.png and quality_vs_training.png in ``out_dir``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = _evals(data)
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
    final_step = {v: r.get("final_step") for v, r in data["runs"].items()}
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


def render(data: dict, labels: dict, figure_dir: str) -> str:
    ev = _evals(data)
    runs = data["runs"]
    variants = [v for v in labels if v in runs]
    final_step = {v: r.get("final_step") for v, r in runs.items()}
    cfg = data.get("config", {}).get(BASE) or next(iter(data.get("config", {}).values()), {})
    hw = data.get("hardware", {})
    lines = [
        f"Budget **{data.get('budget')}**: {cfg.get('params', 0) / 1e6:.2f}M-parameter MM-DiT, "
        f"{cfg.get('resolution')}×{cfg.get('resolution')} shapes world, {cfg.get('steps')} steps at batch "
        f"{cfg.get('batch_size')}, GenEval-lite on {cfg.get('prompts')} prompts (seed fixed; same noise for "
        f"every method). Hardware: {hw.get('gpu') or hw.get('cpu')} ({hw.get('cores')} cores), torch {hw.get('torch')}.",
        "", f"Regenerate: `{data.get('command', 'python pipelines/reproduce.py')}`", "",
        "### Headline: GenEval-lite overall, final models", "", headline(ev, labels), "",
        "### The paper's claims, checked", "", *[f"- {c}" for c in claims(ev)], "",
        f"![quality vs steps]({figure_dir}/quality_vs_steps.png) ![quality vs training]({figure_dir}/quality_vs_training.png)",
        "", "### Quality vs training progress (GenEval-lite overall)", "",
        progress(ev, [v for v in (BASE, REFERENCE) if v in runs], final_step), "",
        "### Training ablations (same budget; overall at each step count)", "", ablations(ev, variants, labels), "",
        "### Inference ablation: landing time s (final models)", "", inference_table(ev, "landing-"), "",
        "### Inference diagnostics: guidance ω and DDIM η (default ω = 5, η = 1)", "", inference_table(ev, "w"), "",
    ]
    for v in variants:
        lines += [f"### Per task: {labels[v][0]} (final)", "", per_task(ev, v), ""]
    lines += ["### Wall times", "", "| variant | training (s) | whole job (s) | MLflow run | registered |",
              "|---|---|---|---|---|"]
    for v in variants:
        r = runs[v]
        lines.append(f"| {v} | {r['train_s']:.0f} | {r['job_s']:.0f} | {r.get('mlflow_run_id') or '—'} | "
                     f"selfe-reproduce v{r.get('model_version')} |")
    evals_s = sum(s.get("eval_s", 0) for s in data["evals"].values())
    lines += ["", f"Evaluation outside the jobs (checkpoints and inference ablations): {evals_s:.0f} s."]
    for key, wall in data.get("wall_s", {}).items():
        lines.append(f"Study wall time for `{key}`: {wall} s.")
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
