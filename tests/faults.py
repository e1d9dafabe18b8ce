"""Fault injection for tests and benchmarks, passed to the workers as a step hook
(``WorkerInputs.step_hooks``); the training loop itself carries no fault code."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class KillOnce:
    """Kill the last rank's process right after optimiser step ``step``, once per ``marker`` file:
    a worker dying mid-run, as on a preempted node. The restarted run finds the marker and goes on."""

    step: int
    marker: str

    def __call__(self, step: int, rank: int, world: int, stats: dict | None = None) -> None:
        if step != self.step or rank != world - 1:
            return
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text(str(step))
            os._exit(1)


@dataclass
class TermOnce:
    """Send SIGTERM to the last rank's own process right after optimiser step ``step``, once per
    ``marker`` file: a spot agent or an operator's ``kill`` reaching one worker. The marker holds the
    pid, so a test can see that this process is gone."""

    step: int
    marker: str

    def __call__(self, step: int, rank: int, world: int, stats: dict | None = None) -> None:
        import signal

        marker = Path(self.marker)
        if step == self.step and rank == world - 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class LossRecord:
    """Append ``step world loss`` to ``path`` after every step of rank 0: the loss history of a run
    across its restarts and resizes (a step redone after a restart appears again)."""

    path: str

    def __call__(self, step: int, rank: int, world: int, stats: dict | None = None) -> None:
        if rank == 0 and stats is not None:
            with open(self.path, "a") as f:
                f.write(f"{step} {world} {stats['loss']!r}\n")


@dataclass
class GraphCount:
    """Append dynamo's count of compiled graphs in this process after every step of rank 0: a compiled
    run that recompiles in steady training shows the count still rising. From the first call on, a block
    that hits dynamo's recompile limit fails the run instead of going on eagerly (where the count would
    stay flat)."""

    path: str

    def __call__(self, step: int, rank: int, world: int, stats: dict | None = None) -> None:
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.config.fail_on_recompile_limit_hit = True
        if rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{counters['stats']['unique_graphs']}\n")


def read_losses(path: str | Path) -> tuple[dict[int, float], list[int]]:
    """({step: the last loss recorded for it}, the world size of every recorded step in order)."""
    losses, worlds = {}, []
    for line in Path(path).read_text().splitlines():
        step, world, loss = line.split()
        losses[int(step)] = float(loss)
        worlds.append(int(world))
    return losses, worlds


@dataclass
class Pace:
    """Sleep ``seconds`` after every step: a tiny model's run slowed to last while a test changes the
    cluster under it."""

    seconds: float

    def __call__(self, step: int, rank: int, world: int, stats: dict | None = None) -> None:
        import time

        time.sleep(self.seconds)
