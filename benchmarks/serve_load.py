"""Load on the Ray Serve server: closed-loop clients on 127.0.0.1, latency percentiles, images/s, errors.

    python benchmarks/serve_load.py --model outputs/<run>/model            # or models:/selfe@candidate
    python benchmarks/serve_load.py --model ... --steps 2 --concurrency 32 --seconds 60 --json out.json

Starts a local Ray and the selfe application (``selfe.serve.app``) on 127.0.0.1, then for every (steps,
concurrency) cell runs that many clients, each sending its next request as soon as the last one is
answered (after a 503, once its ``Retry-After`` has passed), for ``--seconds`` (after a warm-up request per client). Then the batching gain: the same
load at the largest concurrency and 2 steps against a deployment with ``max_batch_size = 1``, and an
overload run with more clients than the replica admits plus its queue, which must be answered 503
(never left hanging). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Cell:
    steps: int
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    hung: int = 0

    def summary(self) -> dict:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None

        return {"steps": self.steps, "concurrency": self.concurrency, "requests": sum(self.statuses.values()),
                "ok": self.statuses.get(200, 0), "errors": sum(n for s, n in self.statuses.items() if s != 200),
                "statuses": self.statuses, "hung": self.hung, "p50_ms": pct(0.50), "p95_ms": pct(0.95),
                "p99_ms": pct(0.99), "images_per_s": round(self.images / self.seconds, 1) if self.seconds else 0.0}


def post(port: int, body: dict, timeout: float) -> tuple[int, float, float]:
    """(status, seconds, Retry-After seconds or 0) of one POST /v1/images; status 0 when no answer came
    within ``timeout``."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/images", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - t0, float(response.getheader("Retry-After") or 0)
    except (TimeoutError, OSError):
        return 0, time.perf_counter() - t0, 0.0
    finally:
        conn.close()


def run_cell(port: int, steps: int, concurrency: int, seconds: float, timeout: float, warm_up: bool = True) -> Cell:
    """``concurrency`` closed-loop clients for ``seconds``; each asks for one image of its own prompt/seed,
    after one uncounted request when ``warm_up``."""
    cell, lock = Cell(steps, concurrency), threading.Lock()
    prompts = ["a photo of a red circle", "two blue squares", "a green triangle to the left of a yellow circle",
               "three purple circles"]

    def client(i: int) -> None:
        body = {"prompt": prompts[i % len(prompts)], "steps": steps, "seed": i}  # PNG answers
        if warm_up:
            post(port, body, timeout)
        start.wait()
        while time.perf_counter() < end[0]:
            status, dt, retry_after = post(port, body, timeout)
            if status == 503:  # as a well-behaved client does: wait as long as the server asks
                time.sleep(retry_after)
            with lock:
                cell.statuses[status] = cell.statuses.get(status, 0) + 1
                cell.hung += status == 0
                if status == 200:
                    cell.latencies.append(dt)
                    cell.images += 1

    start, end = threading.Event(), [0.0]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    end[0] = t0 + seconds
    start.set()
    for t in threads:
        t.join()
    cell.seconds = time.perf_counter() - t0
    return cell


def deploy(settings, port: int) -> None:
    from ray import serve

    from selfe.serve.app import application

    serve.run(application(settings), name="selfe", route_prefix="/")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models:/selfe@candidate")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 50])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=20.0, help="per cell")
    ap.add_argument("--gain-seconds", type=float, default=60.0, help="the batched vs unbatched runs")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=60.0, help="request timeout (server and client)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from selfe.serve.settings import ServeSettings
    from selfe.storage import ensure_ray

    ensure_ray(log_to_driver=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    top = max(args.concurrency)
    batched = ServeSettings(model=args.model, tracking_uri=args.tracking_uri, device="cpu",
                            max_batch_size=args.max_batch_size, batch_wait_s=0.01, max_ongoing_requests=2 * top,
                            max_queued_requests=2 * top, request_timeout_s=args.timeout, poll_s=0)
    out: dict = {"settings": batched.as_dict(), "cells": []}
    try:
        deploy(batched, args.port)
        for steps in args.steps:
            for concurrency in args.concurrency:
                cell = run_cell(args.port, steps, concurrency, args.seconds, args.timeout).summary()
                out["cells"].append(cell)
                print(json.dumps(cell), flush=True)
        gain_steps = 2
        with_batching = run_cell(args.port, gain_steps, top, args.gain_seconds, args.timeout).summary()
        # Overload: more clients than the replica admits plus its queue; the rest must get 503 at once.
        overload = run_cell(args.port, gain_steps, 3 * (batched.max_ongoing_requests + batched.max_queued_requests),
                            20.0, args.timeout, warm_up=False).summary()
        unbatched = ServeSettings(**{**batched.as_dict(), "max_batch_size": 1, "max_images": 1, "deployed_version": 0})
        deploy(unbatched, args.port)
        without = run_cell(args.port, gain_steps, top, args.gain_seconds, args.timeout).summary()
    finally:
        serve.shutdown()
        ray.shutdown()
    out.update(batched_60s=with_batching, unbatched_60s=without, overload=overload,
               batching_gain=round(with_batching["images_per_s"] / max(without["images_per_s"], 1e-9), 2))
    print(json.dumps({k: out[k] for k in ("batched_60s", "unbatched_60s", "overload", "batching_gain")}, indent=1))
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def table(out: dict) -> str:
    rows = ["| steps | clients | requests | errors | p50 ms | p95 ms | p99 ms | images/s |", "|---|---|---|---|---|---|---|---|"]
    for c in out["cells"]:
        rows.append(f"| {c['steps']} | {c['concurrency']} | {c['requests']} | {c['errors']} | {c['p50_ms']} | "
                    f"{c['p95_ms']} | {c['p99_ms']} | {c['images_per_s']} |")
    for name in ("batched_60s", "unbatched_60s", "overload"):
        c = out[name]
        rows.append(f"| {c['steps']} ({name}) | {c['concurrency']} | {c['requests']} | {c['errors']} "
                    f"({', '.join(f'{s}: {n}' for s, n in sorted(c['statuses'].items()))}; hung {c['hung']}) | "
                    f"{c['p50_ms']} | {c['p95_ms']} | {c['p99_ms']} | {c['images_per_s']} |")
    rows.append(f"\nbatching gain at 2 steps, {out['batched_60s']['concurrency']} clients: {out['batching_gain']}x")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
