"""The local Ray the job starts (``selfe.storage.ensure_ray``): workers at niceness 0, not Ray's 15."""

from __future__ import annotations

import os
import subprocess
import sys


def test_local_ray_workers_run_at_niceness_zero():
    # At Ray's default 15 the training worker yields to the raylet, GCS and driver whenever they wake
    # (docs/benchmarks.md: 0.83-0.87x the plain loop's step rate on 2 cores).
    code = ("import os, ray; from selfe.storage import ensure_ray; ensure_ray(1, log_to_driver=False); "
            "print('NICE', ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_worker_niceness", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert "NICE 0" in out.stdout, (out.stdout[-500:], out.stderr[-2000:])
