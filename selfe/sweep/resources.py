"""What one trial holds on the cluster, how many fit at once, and giving it all back.

A trial is a small Tune actor that drives a TorchTrainer; the Train controller (no CPUs) creates a
placement group for its workers. When ASHA stops a trial, Tune ends the trial actor, and with it the
controller, which never gets to remove that placement group: Ray ties a placement group's lifetime
to the *job*, so it would hold its CPUs until the sweep ends and the next trials would wait forever.
Train V2 has a cleaner for this, but it asks the State API whether the controller is alive, which
needs the Ray dashboard and a single Ray instance on the machine; without them it only logs
"Failed to query Ray Train Controller actor state". ``ReleaseOrphanedPlacementGroups`` does the job
from the sweep driver instead.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ray import tune

from selfe.config import Config
from selfe.configtools import ConfigError

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
    need = {"CPU": TRIAL_DRIVER_CPUS + t.num_workers * t.cpus_per_worker}
    if t.use_gpu:
        need["GPU"] = float(t.num_workers)
    need.update({k: t.num_workers * v for k, v in t.worker_resources.items()})
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


def orphaned_placement_groups() -> list[Any]:
    """Placement groups whose creating actor is dead but which Ray keeps while the job lives.

    Reads the GCS table directly: the public ``ray.util.placement_group_table()`` leaves out who
    created a group. Tune's own trial groups are created by the driver, not an actor: they never match.
    """
    from ray import ActorID
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, PlacementGroupID

    table = gcs_pb2.PlacementGroupTableData
    orphans = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        # A group made by a driver has a nil creator actor, which the GCS also marks dead.
        by_actor = pg.creator_actor_id and not ActorID(pg.creator_actor_id).is_nil()
        if by_actor and pg.creator_actor_dead and not pg.is_detached and pg.state != table.REMOVED:
            orphans.append(PlacementGroup(PlacementGroupID(pg.placement_group_id)))
    return orphans


class ReleaseOrphanedPlacementGroups(tune.Callback):
    """Removes the Train placement groups of trials that Tune ended (see the module docstring).

    Checks when a trial completes or fails, and every ``interval_s`` while the sweep runs: the
    controller of a stopped trial dies a moment after Tune reports the trial complete.
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0

    def release(self) -> int:
        from ray.util import remove_placement_group

        self._last = time.monotonic()
        released = 0
        for pg in orphaned_placement_groups():
            try:
                remove_placement_group(pg)
                released += 1
            except Exception as e:  # noqa: BLE001 - removed meanwhile (e.g. by Train's own cleaner)
                logger.debug("placement group %s already gone: %s", pg.id.hex(), e)
        return released

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.interval_s:
            self.release()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.release()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.release()
