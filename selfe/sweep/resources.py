"""What one trial holds on the cluster, how many fit at once, and giving it all back.

A trial is a small Tune actor that drives a TorchTrainer; the Train controller (no CPUs) creates a
placement group for its workers. When ASHA stops a trial, Tune ends the trial actor, and with it the
controller, which never gets to remove that placement group: Ray ties a placement group's lifetime
to the *job*, so it would hold its CPUs until the sweep ends and the next trials would wait forever.
Train V2 has a cleaner for this, but it asks the State API whether the controller is alive, which
needs the Ray dashboard and a single Ray instance on the machine; without them it only logs
"Failed to query Ray Train Controller actor state". ``ReleaseStoppedTrialGroups`` does the job
from the sweep driver instead, with public APIs only.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import ray
from ray import tune

from selfe.config import Config
from selfe.configtools import ConfigError
from selfe.train.handoff import PLACEMENT_GROUP_KEY

logger = logging.getLogger(__name__)

TRIAL_DRIVER_CPUS = 0.1
"""What the trial's own actor reserves: it only waits on the TorchTrainer (Tune rejects 0)."""
DATA_CPUS = 1.0
"""Left free for Ray Data: its read and map tasks ask for one CPU each by default, and a trial whose
workers hold the CPUs its read task needs waits forever."""


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds while it trains: its driver's CPUs plus its Train workers' CPUs, GPUs and
    custom resources (train.worker_resources)."""
    t = cfg.train
    workers = t.max_workers  # an elastic trial may grow to its range's high end
    need = {"CPU": TRIAL_DRIVER_CPUS + workers * t.cpus_per_worker}
    if t.use_gpu:
        need["GPU"] = float(workers)
    need.update({k: workers * v for k, v in t.worker_resources.items()})
    return need


def max_concurrent_trials(cfg: Config, cluster: dict[str, float], cap: int = 0) -> int:
    """How many trials fit on ``cluster`` (``ray.cluster_resources()``) at once with DATA_CPUS to
    spare for Ray Data; ``cap`` > 0 lowers it. Raises ConfigError when not even one fits."""
    need = trial_resources(cfg)
    fits = math.floor((cluster.get("CPU", 0.0) - DATA_CPUS) / need["CPU"] + 1e-9)
    for name, amount in need.items():
        if name != "CPU" and amount > 0:
            fits = min(fits, math.floor(cluster.get(name, 0.0) / amount + 1e-9))
    if fits < 1:
        have = {k: cluster.get(k, 0.0) for k in need}
        raise ConfigError(
            f"one trial needs {need} plus {DATA_CPUS} CPU for Ray Data reads, but the cluster has {have}: lower "
            "train.cpus_per_worker (fractions are fine) or train.num_workers in [base], or add nodes")
    return min(fits, cap) if cap else fits


def live_placement_groups() -> set[str]:
    """Hex ids of the placement groups that still hold (or wait for) resources."""
    from ray.util import placement_group_table

    return {pg_id for pg_id, row in placement_group_table().items() if row["state"] != "REMOVED"}


class ReleaseStoppedTrialGroups(tune.Callback):
    """Removes the Train placement group of each trial that Tune ended (see the module docstring).

    Every Train report carries the group its workers run in (``PLACEMENT_GROUP_KEY``, from the
    public ``ray.util.get_current_placement_group``); the latest one per trial is kept. When Tune
    ends a trial, its group is removed ``grace_s`` later: Tune calls ``on_trial_complete`` *before* it
    stops the trial actor, and a group removed under a living controller would look like lost workers
    to it, which it answers by starting new ones in a new group. A trial that finished by itself has
    already removed its group; it is left alone.
    """

    def __init__(self, grace_s: float = 3.0) -> None:
        self.grace_s = grace_s
        self._group: dict[str, str] = {}  # trial id -> the latest reported group
        self._ended: list[tuple[float, str]] = []  # (when its trial ended, group)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(PLACEMENT_GROUP_KEY):
            self._group[trial.trial_id] = result[PLACEMENT_GROUP_KEY]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_ended(trial)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.release()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._ended:  # the sweep's last stopped trial: nothing else will come back to it
            time.sleep(max(0.0, self._ended[-1][0] + self.grace_s - time.monotonic()))
        self.release()

    def _trial_ended(self, trial: Any) -> None:
        group = self._group.pop(trial.trial_id, None)
        if group:
            self._ended.append((time.monotonic(), group))

    def release(self) -> int:
        """Remove the groups whose trial ended at least ``grace_s`` ago; returns how many it removed."""
        from ray.util import remove_placement_group
        from ray.util.placement_group import PlacementGroup

        now = time.monotonic()
        due = [g for t, g in self._ended if now - t >= self.grace_s]
        if not due:
            return 0
        self._ended = [(t, g) for t, g in self._ended if now - t < self.grace_s]
        live, released = live_placement_groups(), 0
        for group in due:
            if group not in live:
                continue  # its controller removed it (the trial finished, or failed cleanly)
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group)))
                released += 1
            except Exception as e:  # noqa: BLE001 - removed meanwhile (e.g. by Train's own cleaner)
                logger.debug("placement group %s already gone: %s", group, e)
        if released:
            logger.info("released %d placement group(s) of stopped trials", released)
        return released


CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_credentials_out_of_trials() -> None:
    """Stop Tune from copying the driver's AWS keys into every trial actor's runtime environment
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``): Ray's runtime-env agent writes that
    environment to its log in plain text. Trials get credentials as every other Ray worker does: from
    their node (instance role, credentials file) or the environment the node's Ray started with (a
    local Ray inherits the driver's)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(CREDENTIAL_VARIABLES)
