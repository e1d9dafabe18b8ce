"""What a sweep found: one row per trial, the winner, a markdown table and a plot."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from selfe.sweep import ledger as ledger_status
from selfe.sweep.ledger import Ledger
from selfe.sweep.space import HORIZON, SELF_EVAL_WEIGHT, SweepSpec

COMPLETED, STOPPED, INTERRUPTED, FAILED = "completed", "stopped early", "interrupted", "failed"


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    outcome: str
    """completed (ran all its steps), stopped early (by ASHA), interrupted (a rerun goes on) or failed."""
    step: int
    """Last step the trial reported."""
    metric: float | None
    """The sweep metric in the trial's last report."""
    checkpoint_path: str | None
    """The trial's most recent Train checkpoint."""
    error: str | None = None
    child_run_id: str | None = None


def rows_from_ledger(ledger: Ledger, spec: SweepSpec) -> list[TrialRow]:
    """The ledger's trials -> rows, in plan order. A trial still pending or running (the driver ended
    before it did) shows as interrupted."""
    outcome = {ledger_status.COMPLETED: COMPLETED, ledger_status.STOPPED: STOPPED, ledger_status.FAILED: FAILED}
    return [TrialRow(trial_id=r.key, params={k: v for k, v in r.params.items() if k in spec.keys()},
                     outcome=outcome.get(r.status, INTERRUPTED), step=r.step, metric=r.metric,
                     checkpoint_path=r.checkpoint_path, error=r.error)
            for r in sorted(ledger.trials.values(), key=lambda r: r.key)]


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best metric among completed trials with a checkpoint (any trial if none completed)."""
    scored = [r for r in rows if r.metric is not None and math.isfinite(r.metric) and r.checkpoint_path]
    pool = [r for r in scored if r.outcome == COMPLETED] or scored
    if not pool:
        return None
    sign = 1 if mode == "max" else -1
    # Ties go to the earlier trial (the reference / first grid point) for a stable answer.
    return max(pool, key=lambda r: (sign * r.metric, -rows.index(r)))


def short_names(keys: list[str]) -> dict[str, str]:
    """Dotted keys -> their last part where that is unambiguous (column headings, legends)."""
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: t if tails.count(t) == 1 else k for k, t in zip(keys, tails)}


def markdown_table(rows: list[TrialRow], spec: SweepSpec, best: TrialRow | None) -> str:
    names = short_names(spec.keys())
    head = ["trial", *names.values(), "steps", "outcome", spec.metric, ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # Completed trials first (their scores are comparable), then those stopped early, interrupted, failed.
    sign = -1 if spec.mode == "max" else 1
    rank = {COMPLETED: 0, STOPPED: 1, INTERRUPTED: 2, FAILED: 3}
    ordered = sorted(rows, key=lambda r: (rank[r.outcome], r.metric is None, sign * (r.metric or 0.0), r.trial_id))
    for r in ordered:
        cells = [r.trial_id, *(_fmt(r.params.get(k)) for k in names), str(r.step), r.outcome,
                 _fmt(r.metric), "**best**" if r is best else (r.error or "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_png(rows: list[TrialRow], spec: SweepSpec) -> bytes | None:
    """The metric against the self-evaluation weight and against the annealing horizon (or the
    first two numeric swept keys), one panel each, coloured by the other; hollow markers are trials
    ASHA stopped early. None when no trial reported the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.metric is not None]
    numeric = [k for k in spec.keys() if all(isinstance(r.params.get(k), (int, float)) for r in scored)]
    axes_keys = [k for k in (SELF_EVAL_WEIGHT, HORIZON) if k in numeric] or numeric[:2]
    if not scored or not axes_keys:
        return None
    names = short_names(spec.keys())
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(5 * len(axes_keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], axes_keys):
        other = next((k for k in axes_keys + numeric if k != key), None)
        groups: dict[Any, list[TrialRow]] = {}
        for r in scored:
            groups.setdefault(r.params.get(other) if other else None, []).append(r)
        for value, group in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            group.sort(key=lambda r: r.params[key])
            label = f"{names[other]}={_fmt(value)}" if other else None
            line, = ax.plot([r.params[key] for r in group], [r.metric for r in group], "-", alpha=0.5, label=label)
            for r in group:
                done = r.outcome == COMPLETED
                ax.plot(r.params[key], r.metric, "o", color=line.get_color(),
                        markerfacecolor=line.get_color() if done else "none")
        ax.set_xlabel(names[key])
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
        if other:
            ax.legend(fontsize=8)
    fig.suptitle(f"{spec.metric} per trial (hollow: stopped early)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
