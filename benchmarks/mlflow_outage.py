"""An MLflow outage during training: what the metrics logger holds, when it delivers, how long close takes.

    python benchmarks/mlflow_outage.py --outage-min 10 --rate 200

Starts a real ``mlflow server`` (SQLite) on 127.0.0.1, creates a run, and logs ``--rate`` metrics per
second through ``selfe.tracking.runlog.RunLogger`` with MLflow's default HTTP retries, as a training loop would.
After a minute the server is killed for ``--outage-min`` minutes while logging goes on; it is then
restarted and logging continues for ``--after-s``. Prints, as JSON: the process's resident memory
before and at the end of the outage, the backlog then, the time from the server's return until the
running logger has delivered everything, the metrics the server holds against those logged, and how
long ``close`` took with the server down (its deadline is ``--close-s``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fault_recovery import mlflow_server  # the same server start as the fault benchmark


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _kill(proc: subprocess.Popen) -> None:
    """Kill the server and its workers (they hold the port if only the parent dies; the server runs
    in its own session)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _close_while_down(run_id: str, spool_dir: Path, close_s: float) -> float:
    """Seconds ``close(close_s)`` of a fresh logger with a backlog takes while the server is down."""
    from selfe.tracking.runlog import RunLogger

    down = RunLogger(run_id, spool_dir=spool_dir, retry_s=1.0)
    for i in range(100):
        down.log_metrics({"x": float(i)}, i)
    t_close = time.time()
    down.close(timeout_s=close_s)
    return time.time() - t_close


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage-min", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0, help="metrics per second (10 keys per log call)")
    ap.add_argument("--before-s", type=float, default=60.0, help="logging before the outage")
    ap.add_argument("--close-s", type=float, default=60.0, help="close() deadline")
    ap.add_argument("--after-s", type=float, default=30.0, help="logging after the server returns")
    return ap.parse_args()


def main() -> int:
    args = _args()
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        os.environ.pop(name, None)  # MLflow's defaults
    import mlflow
    from mlflow.tracking import MlflowClient

    from selfe.tracking.runlog import RunLogger

    work = Path(tempfile.mkdtemp(prefix="mlflow-outage-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(work / "mlflow.db", port)
    mlflow.set_tracking_uri(uri)
    run_id = MlflowClient().create_run(MlflowClient().create_experiment("outage")).info.run_id
    logger = RunLogger(run_id, spool_dir=work / "spool", retry_s=5.0)
    keys, step, logged = [f"m{i}" for i in range(10)], 0, 0
    period = len(keys) / args.rate

    def log_for(seconds: float) -> None:
        nonlocal step, logged
        end = time.time() + seconds
        while time.time() < end:
            step += 1
            logger.log_metrics({k: step * 1e-3 for k in keys}, step)
            logged += len(keys)
            time.sleep(period)

    log_for(args.before_s)
    rss_before, t_down = _rss_mb(), time.time()
    _kill(server)
    peak_rss = rss_before
    while time.time() - t_down < 60 * args.outage_min:
        log_for(10.0)
        peak_rss = max(peak_rss, _rss_mb())
    backlog = logger.pending
    server = mlflow_server(work / "mlflow.db", port)
    t_up = time.time()
    log_for(args.after_s)  # training goes on; the sender catches up meanwhile
    logger.flush(timeout_s=1800)
    delivered_s = time.time() - t_up
    t_close = time.time()
    logger.close(timeout_s=args.close_s)
    close_up_s = time.time() - t_close
    history = {k: len(MlflowClient().get_metric_history(run_id, k)) for k in keys}
    _kill(server)  # close() with the server down
    close_down_s = _close_while_down(run_id, work / "spool2", args.close_s)
    print(json.dumps({
        "outage_min": args.outage_min, "rate_per_s": args.rate, "logged": logged,
        "rss_mb_before_outage": round(rss_before, 1), "rss_mb_peak_in_outage": round(peak_rss, 1),
        "backlog_at_server_return": backlog, "server_return_to_all_delivered_s": round(delivered_s, 1),
        "close_with_server_up_s": round(close_up_s, 1),
        "server_holds": sum(history.values()), "per_key": sorted(set(history.values())), "steps_logged": step,
        "close_with_server_down_s": round(close_down_s, 1), "close_deadline_s": args.close_s,
        "spool_mb": round(logger.spool.stat().st_size / 2**20, 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
