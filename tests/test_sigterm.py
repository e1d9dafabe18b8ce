"""The SIGTERM handler of the training workers (``selfe.train.sigterm``), in this process."""

from __future__ import annotations

import os
import signal
import time
from unittest import mock

import pytest

from selfe.train import sigterm


@pytest.fixture
def previous():
    """A handler standing for Ray's (which ends the worker): records the signals it gets."""
    got: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    yield got
    sigterm.uninstall()
    signal.signal(signal.SIGTERM, old)


def _term() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs on the main thread between bytecodes


def test_the_first_sigterm_is_a_notice_and_leave_passes_it_on(previous):
    sigterm.install(30.0)
    assert sigterm.received_at() is None and sigterm.time_left() == float("inf")
    _term()
    assert previous == [] and sigterm.received_at() is not None
    assert 29.0 < sigterm.time_left() <= 30.0
    sigterm.leave()  # after the checkpoint: the worker ends as the signal would have ended it
    time.sleep(0.05)
    assert previous == [signal.SIGTERM]


def test_a_second_sigterm_ends_at_once(previous):
    sigterm.install(30.0)
    _term()
    _term()
    assert previous == [signal.SIGTERM]


def test_the_grace_running_out_ends_the_worker_without_the_loop(previous):
    sigterm.install(0.2)
    _term()
    deadline = time.time() + 5
    while not previous and time.time() < deadline:
        time.sleep(0.02)
    assert previous == [signal.SIGTERM]


def test_no_grace_leaves_the_handler_alone(previous):
    sigterm.install(0.0)
    _term()
    assert previous == [signal.SIGTERM] and sigterm.received_at() is None


def test_ray_ending_the_group_hands_sigterm_back_before_its_own_kill(previous):
    """Ray Train ends a group (run over, restart, resize) by killing its actors: SIGTERM, then SIGKILL
    5 s later. The backend puts Ray's handler back first, so that SIGTERM ends the workers at once."""
    sigterm.install(30.0)
    calls = []

    class Group:  # the worker group: runs each function here, on this (main) thread
        def __len__(self):
            return 1

        def execute_async(self, fn, *args, **kwargs):
            calls.append(fn.__name__)
            if fn is sigterm.uninstall:
                fn()
            return []

    with mock.patch("ray.get"), mock.patch("ray.wait"):
        sigterm._NoticeBackend().on_shutdown(Group(), sigterm.NoticeTorchConfig())
    assert calls[0] == "uninstall" and "_shutdown_torch" in calls
    _term()
    assert previous == [signal.SIGTERM] and sigterm.received_at() is None
