"""A SIGTERM sent to a training worker becomes a preemption notice: checkpoint first, then end.

Ray Train runs the training function in a thread of the worker actor, and Python lets only the main
thread install a signal handler; the actor's own methods run on that main thread, so the job's backend
(``NoticeTorchConfig``) installs the handler there through ``worker_group.execute`` when training starts.

What the handler does with a SIGTERM (the kill a spot agent, a scheduler or an operator sends):

* the first one is noted (``received_at``) and training goes on; the training loop sees it at its next
  step boundary, writes a checkpoint if one fits in the grace, and then calls ``leave``;
* ``leave``, a second SIGTERM, or the grace running out (a timer) hand the signal to the handler that
  was there before (Ray's: the worker exits as it would have without this module).

So a SIGTERM still ends the worker, at most ``grace_s`` later; Ray Train then restarts or shrinks the
group from the checkpoint, which is at most a step old instead of a checkpoint interval. When Ray Train
ends a group itself (the run is done, a restart, a resize) it first puts Ray's handler back
(``uninstall``), so its own SIGTERM ends the workers at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import ray
from ray.train.torch import TorchConfig

_notice: dict = {"at": None, "grace_s": 0.0, "previous": signal.SIG_DFL, "timer": None}


def install(grace_s: float) -> None:
    """Handle SIGTERM in this process (call on the main thread). ``grace_s`` <= 0: leave it alone."""
    if grace_s <= 0:
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is _on_sigterm:  # installed already (a second start in the same actor)
        return
    _notice.update(at=None, grace_s=grace_s, previous=previous, timer=None)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    if _notice["at"] is None:
        _notice["at"] = time.time()
        # The loop may be stuck (a hung collective, a long evaluation): end on time regardless.
        timer = threading.Timer(_notice["grace_s"], leave)
        timer.daemon = True
        timer.start()
        _notice["timer"] = timer
        print(f"[selfe] SIGTERM: checkpoint at the next step if it fits in {_notice['grace_s']:g} s, then exit",
              flush=True)
        return
    previous = _notice["previous"]
    if callable(previous):
        previous(signum, frame)
    else:  # SIG_DFL or SIG_IGN: put it back and deliver the signal again to get that behaviour
        signal.signal(signal.SIGTERM, previous)
        if previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)


def received_at() -> float | None:
    """time.time() of the SIGTERM being answered, or None."""
    return _notice["at"]


def time_left() -> float:
    """Seconds of the grace left since the SIGTERM (inf without one)."""
    at = _notice["at"]
    return float("inf") if at is None else _notice["grace_s"] - (time.time() - at)


def leave() -> None:
    """End this worker the way the SIGTERM would have (from any thread: the signal goes to the main
    thread's handler, which now passes it on)."""
    if _notice["timer"] is not None:
        _notice["timer"].cancel()
    os.kill(os.getpid(), signal.SIGTERM)


def uninstall() -> None:
    """Put the previous handler back and forget a pending notice (main thread)."""
    if _notice["timer"] is not None:
        _notice["timer"].cancel()
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _notice["previous"])
    _notice.update(at=None, grace_s=0.0, previous=signal.SIG_DFL, timer=None)


class _NoticeBackend(TorchConfig().backend_cls):
    """Torch's process-group backend, plus the SIGTERM handler on every worker's main thread while the
    group trains."""

    def on_training_start(self, worker_group, backend_config: "NoticeTorchConfig") -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install, backend_config.sigterm_grace_s)

    def on_shutdown(self, worker_group, backend_config: "NoticeTorchConfig") -> None:
        # Ray Train is ending the group itself (the run is over, or it restarts or resizes it): its kill
        # sends SIGTERM, then SIGKILL 5 s later. Handing SIGTERM back to Ray's handler first lets that
        # end the workers at once, as it did before, instead of being taken for a preemption notice.
        # A worker that is already gone answers with an error, which changes nothing here.
        refs = worker_group.execute_async(uninstall)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=10)
        super().on_shutdown(worker_group, backend_config)


@dataclass
class NoticeTorchConfig(TorchConfig):
    """``TorchConfig`` whose workers answer SIGTERM within ``sigterm_grace_s`` (0: Ray's behaviour)."""

    sigterm_grace_s: float = 0.0

    @property
    def backend_cls(self):
        return _NoticeBackend
