"""The quiet console: selfe's own lines on the console, Ray's and the libraries' output in the log file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from selfe.train.worker import format_eta

DRIVER = textwrap.dedent("""
    import logging, os, sys, time, warnings
    from selfe.console import QuietConsole
    console = QuietConsole(sys.argv[1], verbose=sys.argv[2] == "verbose")
    import ray
    from selfe.storage import ensure_ray
    ensure_ray(1)
    console.attach_ray()

    @ray.remote(num_cpus=0)
    def work():
        print("[selfe] step 1/2 from a worker", flush=True)
        print("Running Dataset: progress noise", flush=True)
        print("worker stderr noise", file=sys.stderr, flush=True)

    ray.get(work.remote())
    logging.getLogger("ray.data").warning("ray logger noise")
    warnings.warn("a deprecation noise", DeprecationWarning)
    os.write(2, b"core_worker.cc: C-level noise\\n")
    print("[selfe] the driver's own line", flush=True)
    print("a driver error", file=sys.stderr, flush=True)
    time.sleep(3)  # the log monitor forwards worker output about once a second
    ray.shutdown()
""")
NOISE = ("progress noise", "worker stderr noise", "ray logger noise", "a deprecation noise", "C-level noise")


def _run(tmp_path, mode: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", DRIVER, str(log), mode], env=env, capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, log.read_text() if log.exists() else ""


def test_the_console_shows_selfe_lines_once_and_the_log_file_the_rest(tmp_path):
    out, log = _run(tmp_path, "quiet")
    console = out.stdout + out.stderr
    # Ray Train and Ray both deliver a worker's prints twice (its stdout and stderr copies): shown once.
    assert out.stdout.splitlines().count("[selfe] step 1/2 from a worker") == 1, console
    assert "[selfe] the driver's own line" in out.stdout
    assert "a driver error" in out.stderr  # Python's stderr (errors, tracebacks) stays on the console
    for noise in NOISE:
        assert noise not in console, (noise, console)
        assert noise in log, (noise, log[-3000:])
    assert "[selfe] step 1/2 from a worker" in log  # the log file has the whole story


def test_verbose_leaves_every_stream_on_the_console(tmp_path):
    out, log = _run(tmp_path, "verbose")
    console = out.stdout + out.stderr
    for noise in ("progress noise", "worker stderr noise", "ray logger noise", "C-level noise"):
        assert noise in console, (noise, console[-3000:])
    assert log == ""


def test_eta_reads_as_minutes_and_hours():
    assert [format_eta(s) for s in (float("nan"), 5.4, 185, 3725)] == ["?", "5 s", "3m05s", "1h02m"]
