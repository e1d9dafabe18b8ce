"""An MLflow outage during training: what the metrics logger holds, when it delivers, how long close takes.

    python benchmarks/mlflow_outage.py --outage-min 10 --rate 200

Starts a real ``mlflow server`` (SQLite) on 127.0.0.1, creates a run, and logs ``--rate`` metrics per
second through ``selfe.runlog.RunLogger`` with MLflow's default HTTP retries, as a training loop would.
After a minute the server is killed for ``--outage-min`` minutes while logging goes on; it is then
restarted. Prints, as JSON: the logger's resident memory growth and queue length during the outage,
how many metrics it dropped from memory, the time from the server's return to full delivery (the
running logger, then a new logger for the same run replaying the spool, as a resubmitted job would),
the metrics the server holds at the end against those logged, and how long ``close`` took with the
server down (its deadline is ``--close-s``).
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
import urllib.request
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _server(port: int, db: Path, art: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root", art.as_uri(), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def _kill(proc: subprocess.Popen) -> None:
    """Kill the server and its workers (they hold the port if only the parent dies)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage-min", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0, help="metrics per second (10 keys per log call)")
    ap.add_argument("--before-s", type=float, default=60.0, help="logging before the outage")
    ap.add_argument("--close-s", type=float, default=60.0, help="close() deadline")
    ap.add_argument("--max-pending", type=int, default=50_000)
    args = ap.parse_args()
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        os.environ.pop(name, None)  # MLflow's defaults

    import mlflow
    from mlflow.tracking import MlflowClient

    from selfe.runlog import RunLogger

    work = Path(tempfile.mkdtemp(prefix="mlflow-outage-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = _server(port, work / "mlflow.db", work / "art")
    mlflow.set_tracking_uri(uri)
    run_id = MlflowClient().create_run(MlflowClient().create_experiment("outage")).info.run_id
    logger = RunLogger(run_id, spool_dir=work / "spool", retry_s=5.0, max_pending=args.max_pending)
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
    peak_pending = 0
    while time.time() - t_down < 60 * args.outage_min:
        log_for(10.0)
        peak_pending = max(peak_pending, len(logger.pending))
    rss_outage = _rss_mb()
    server = _server(port, work / "mlflow.db", work / "art")
    t_up = time.time()
    closed_t0 = time.time()
    logger.close(timeout_s=args.close_s)  # the job ends: its logger delivers what it still holds
    close_after_return_s = time.time() - closed_t0
    replay = RunLogger(run_id, spool_dir=work / "spool", retry_s=1.0)  # a resubmitted job's logger
    replayed = replay.replayed
    replay.close(timeout_s=1800)
    delivered_s = time.time() - t_up
    history = {k: len(MlflowClient().get_metric_history(run_id, k)) for k in keys}
    # close() with the server down: a fresh logger with a backlog, server killed again.
    _kill(server)
    down = RunLogger(run_id, spool_dir=work / "spool2", retry_s=1.0)
    for i in range(100):
        down.log_metrics({"x": float(i)}, i)
    t_close = time.time()
    down.close(timeout_s=args.close_s)
    close_down_s = time.time() - t_close
    print(json.dumps({
        "outage_min": args.outage_min, "rate_per_s": args.rate, "logged": logged, "max_pending": args.max_pending,
        "rss_mb_before": round(rss_before, 1), "rss_mb_after_outage": round(rss_outage, 1),
        "peak_pending": peak_pending, "dropped_from_memory": logger.dropped,
        "close_after_server_returned_s": round(close_after_return_s, 1), "replayed_by_next_logger": replayed,
        "server_return_to_full_delivery_s": round(delivered_s, 1),
        "server_holds": sum(history.values()), "server_holds_per_key_steps": sorted(set(history.values())),
        "close_with_server_down_s": round(close_down_s, 1), "close_deadline_s": args.close_s,
        "spool_mb": round(sum(p.stat().st_size for p in (work / "spool").glob("*")) / 2**20, 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
