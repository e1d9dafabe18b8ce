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

    def __call__(self, step: int, rank: int, world: int) -> None:
        if step != self.step or rank != world - 1:
            return
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text(str(step))
            os._exit(1)
