"""Ray Tune sweeps over Self-E training: one TorchTrainer per trial, ASHA on the few-step
GenEval-lite score, an MLflow parent run per sweep with one child run per trial.

    space.py    the search space from TOML: validation, Optuna's param space
    trial.py    what runs inside one Tune trial
    resources.py  what a trial holds, how many fit at once, releasing what stopped trials leave
    ledger.py   the sweep's state as JSON: the plan of trials, their outcomes; what a resume reruns
    resume.py   the Tune side of the ledger: searcher, ASHA rebuilt from it, the callback that writes it
    runner.py   the sweep driver: cache, MLflow parent, one fresh Tuner per driver run, best model
    summary.py  results table and plot
"""

from selfe.sweep.space import SweepSpec, load_space

__all__ = ["SweepSpec", "load_space"]
