"""Size the preprocessing job's encoder actor pool from the Ray cluster it runs on.

The encoders are the build's bottleneck; rendering, decoding and writing are light. So on a CPU-only
cluster every CPU the read/write tasks do not need goes to encoder actors, one actor per CPU (each
runs one torch thread per reserved CPU, rounded up: threads in separate actors scale better than one
actor's intra-op threads on small batches). On 2 cores beside 0.5-CPU write tasks that is two actors
at 0.75 CPUs, which also render the shapes scenes they encode (docs/benchmarks.md, "Preprocessing").
On a GPU cluster it is one actor per GPU at 1 CPU each, which leaves the node's other CPUs to the image
decoding.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from selfe.configtools import ConfigError

from selfe.data.sources import read_task_cpus, shapes_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderPool:
    actors: int
    cpus: float
    """CPUs reserved per actor."""
    gpus: float
    """GPUs reserved per actor."""
    task_cpus: float
    """CPUs the read/write tasks need beside the actors."""


def plan_encoder_pool(data, source_format: str, cluster: dict[str, float], nodes: int = 1) -> EncoderPool:
    """The pool for ``data`` (a ``DataConfig``): its explicit settings, the rest from ``cluster``
    (``ray.cluster_resources()``: ``{"CPU": n, "GPU": m, ...}``) and its number of CPU ``nodes``.

    Auto rules (a field left ``None``): gpus = 1 when the cluster has GPUs, else 0; actors = GPUs / gpus
    on a GPU cluster, else round(CPUs - task_cpus), capped at one per rendered block of shapes; cpus = 1 on a
    GPU cluster, else (CPUs - task_cpus) / actors, rounded down to 0.01. On several CPU nodes actors
    take 1 CPU each and there are floor(CPUs - task_cpus) of them: an actor must fit on one node, and
    fractions spread over nodes would leave no node a whole task's CPUs. Whether the pool fits is
    ``starved_message``'s question.
    """
    total, total_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    tasks = read_task_cpus(source_format, data.decode_cpus)
    spare = total - tasks
    gpus = data.encode_gpus if data.encode_gpus is not None else (1.0 if total_gpus > 0 else 0.0)
    if data.encode_actors is not None:
        actors = data.encode_actors
    elif gpus > 0:
        actors = max(1, int(total_gpus // gpus))
    else:
        actors = max(1, math.floor(spare + 0.5) if nodes <= 1 else math.floor(spare))
        if source_format == "shapes":  # each rendered block goes to one actor: more actors get nothing
            actors = min(actors, shapes_blocks(data.num_samples))
    if data.encode_cpus is not None:
        cpus = data.encode_cpus
    elif gpus > 0 or spare <= 0 or nodes > 1:  # spare <= 0: a cluster whose workers have not joined yet
        cpus = 1.0
    else:
        cpus = max(0.01, math.floor(spare / actors * 100) / 100)
    return EncoderPool(actors=actors, cpus=cpus, gpus=gpus, task_cpus=tasks)


def starved_message(pool: EncoderPool, total_cpus: float) -> str | None:
    """Why ``pool`` would leave the read/write tasks waiting forever on ``total_cpus``, or None if it fits."""
    if pool.actors * pool.cpus + pool.task_cpus <= total_cpus + 1e-9:
        return None
    return (
        f"the encoder actors need {pool.actors} x {pool.cpus:g} CPUs, which leaves less than the "
        f"{pool.task_cpus:g} of the {total_cpus:g} CPUs in this Ray cluster that the read and write tasks need; "
        f"the job would wait forever. Lower data.encode_actors, data.encode_cpus or data.decode_cpus (fractions "
        f"are allowed), or leave data.encode_actors and data.encode_cpus unset to size the pool from the cluster"
    )


def cluster_encoder_pool(cfg, source_format: str) -> EncoderPool:
    """The pool for the running Ray cluster; refuses one that leaves the read/write tasks no CPU (Ray
    would wait forever), except on a cluster named by ``RAY_ADDRESS``, which may still grow: a warning."""
    import ray

    # Size from the CPUs free now (a job may hold some, e.g. a trial beside the build); check against all.
    resources = ray.cluster_resources()
    total = resources.get("CPU", 0.0)
    cluster = {**resources, "CPU": ray.available_resources().get("CPU", 0.0)}
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    pool = plan_encoder_pool(cfg.data, source_format, cluster, nodes)
    if message := starved_message(pool, total):
        if not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(message)
        log.warning(message)
    return pool
