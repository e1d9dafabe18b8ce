"""Ray Tune sweeps over Self-E training: one TorchTrainer per trial, ASHA on the few-step
GenEval-lite score, an MLflow parent run per sweep with one child run per trial.

    space.py    the search space from TOML: validation, Tune param space, search algorithm
    trial.py    what runs inside one Tune trial
    resources.py  what a trial holds, how many fit at once, releasing what stopped trials leave
    runner.py   the sweep driver: cache, MLflow parent, Tuner (fresh or restored), best model
    summary.py  results table and plot
"""

from selfe.sweep.space import SweepSpec, load_space

__all__ = ["SweepSpec", "load_space"]
