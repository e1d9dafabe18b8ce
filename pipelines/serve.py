"""Serve a registered model over HTTP with Ray Serve: a web page, a JSON/PNG API, dynamic batching.

    python pipelines/serve.py --model models:/selfe@champion            # http://127.0.0.1:8000/, Ctrl-C stops
    curl -X POST http://127.0.0.1:8000/v1/images -H 'Content-Type: application/json' \\
         -d '{"prompt": "a photo of a red circle", "steps": 2}' -o circle.png

An alias (``@champion``) is followed: point it at another version and the server loads that version
beside the one it serves and swaps when it is ready. On a cluster, use ``serve run`` / ``serve deploy``
with ``clusters/serve.yaml`` (or KubeRay's RayService, ``clusters/kuberay/rayservice.yaml``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from selfe.cli import OneLineParser, add_device_argument, fail, int_in, missing_sqlite_store, model_ref
from selfe.configtools import ConfigError


def main(argv: list[str] | None = None) -> int:
    from selfe.serve.settings import ServeSettings

    defaults = ServeSettings()
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=defaults.model, type=model_ref,
                    help="models:/name@alias (followed), models:/name/<version> or a model folder")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int_in(1, 65535), default=8000)
    ap.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a serving setting (selfe.serve.settings.ServeSettings), e.g. --set max_batch_size=32")
    ap.add_argument("--verbose", action="store_true", help="show Ray's own log lines in this console")
    add_device_argument(ap)
    args = ap.parse_args(argv)
    try:
        pairs = dict(item.split("=", 1) for item in args.set if "=" in item)
        if len(pairs) != len(args.set):
            raise ConfigError(f"--set takes KEY=VALUE, got {[s for s in args.set if '=' not in s]}")
        settings = ServeSettings.from_dict({**pairs, "model": args.model, "device": args.device,
                                            "tracking_uri": args.tracking_uri})
    except ConfigError as e:
        return fail(str(e))

    # The reference is checked here, before Ray starts: a typo fails in a second, not after a deploy.
    from selfe.serve.source import resolve_version
    from selfe.tracking.runs import resolve_tracking_uri, use_tracking_uri

    settings.tracking_uri = use_tracking_uri(settings.tracking_uri or None)
    if not Path(settings.model).is_dir() and (problem := missing_sqlite_store(settings.tracking_uri)):
        return fail(problem)
    try:
        version = resolve_version(settings.model)
    except Exception as e:  # MlflowException (no such alias or version), OSError, ValueError (a bad reference)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return fail(f"cannot find model {settings.model} in {resolve_tracking_uri()}: {first}")

    import ray
    from ray import serve

    from selfe.serve.app import application
    from selfe.storage import ensure_ray

    ensure_ray(log_to_driver=args.verbose, logging_level="INFO" if args.verbose else "WARNING")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(settings), name="selfe", route_prefix="/", blocking=False)
    except Exception as e:  # e.g. the replica could not load the model: Serve's error, one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        serve.shutdown()
        ray.shutdown()
        return fail(f"the deployment did not start: {first} (Ray's logs: {_serve_logs()})")
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    at = f" (version {version.version})" if version.version is not None else ""
    print(f"serving {settings.model}{at} at {url}/\n"
          f"  page:   {url}/\n"
          f"  API:    curl -X POST {url}/v1/images -H 'Content-Type: application/json' "
          f"-d '{{\"prompt\": \"a photo of a red circle\", \"steps\": 2}}' -o image.png\n"
          f"  docs:   {url}/docs    model: {url}/v1/model\n"
          f"  logs:   {_serve_logs()}\n"
          "Ctrl-C stops it.", flush=True)
    stop.wait()
    print("stopping: the server finishes the requests it holds, then exits", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


def _serve_logs() -> str:
    """Where this Ray session keeps Serve's logs (controller, proxy, replicas)."""
    import ray

    try:
        return str(Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve")
    except Exception:  # not connected, or a Ray without that internal: the usual place
        return "/tmp/ray/session_latest/logs/serve"


if __name__ == "__main__":
    sys.exit(main())
