"""Train a Self-E text-to-image model on Ray and register it in MLflow.

    python pipelines/train.py                                  # embedded default: shapes world, tiny model, CPU
    python pipelines/train.py --config my.toml --train.steps=5000 --optim.lr=1e-4
    ray job submit --working-dir . -- python pipelines/train.py --config clusters/configs/0.5b.toml

Relative output settings (outputs/, ./mlflow.db) resolve under $SELFE_HOME when it is set; a
submitted Ray job runs in Ray's temporary copy of the working directory, so there it needs
$SELFE_HOME (or absolute settings) and refuses to start without.

Every ``--section.field=value`` overrides the config; unknown keys fail before any work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import traceback

from selfe.cli import OneLineParser, fail, int_in, loaded, print_fields
from selfe.config import Config, load_config
from selfe.configtools import ConfigError
from selfe.paths import anchor_outputs, check_outputs


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML config file (see configs/)")
    ap.add_argument("--promote", action="store_true", help="also set the 'champion' alias on the new version")
    ap.add_argument("--out", default="outputs", help="local folder for the exported model, eval tables and grids")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--num-cpus", type=int_in(1), default=None,
                    help="CPUs of the local Ray instance (default: all); the workers' torch threads follow it")
    ap.add_argument("--verbose", action="store_true",
                    help="show Ray's, MLflow's and the libraries' own output on the console too (default: in the "
                         "run's log file only)")
    args, overrides = ap.parse_known_args(argv)

    def load() -> Config:
        cfg = load_config(args.config, overrides)
        args.out = anchor_outputs(cfg, args.out)
        return cfg

    cfg = loaded(load, Config.dump if args.print_config else None)
    if isinstance(cfg, int):
        return cfg
    from selfe.train.job import TrainingFailed, default_run_name, own_run
    from selfe.train.owner import RunInUseError

    cfg.train.run_name = cfg.train.run_name or default_run_name()
    try:
        check_outputs(cfg, args.out)  # before anything is computed that they would hold
        with own_run(cfg, cfg.train.run_name):
            return train(cfg, args)
    except (ConfigError, RunInUseError) as e:  # also found once Ray is up (workers that would starve the reads)
        return fail(str(e))
    except TrainingFailed as e:
        fail(f"training failed: {e}")
        return 1
    except (KeyboardInterrupt, SystemExit):  # Ray Train answers Ctrl-C in fit() with sys.exit(0)
        print(f"\nstopped ({'SIGTERM' if SIGTERM_SEEN else 'Ctrl-C'}); rerun with "
              f"--train.run_name={cfg.train.run_name} to resume from its last checkpoint", file=sys.stderr)
        return 130


SIGTERM_SEEN: list[int] = []
"""Filled by ``stop_on_sigterm``: Ray's blocking calls re-raise a signal handler's exception as a plain
KeyboardInterrupt, so the exception alone cannot say which signal stopped the job."""


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM (``ray job stop``, a Kubernetes pod's end) into KeyboardInterrupt for the block, so
    that the job ends its MLflow run (KILLED) and releases its run name instead of dying mid-step (Ray's
    job supervisor sends SIGKILL 3 s later). Enter it after ``ray.init``, which installs its own."""
    def stop(signum, frame):
        SIGTERM_SEEN.append(signum)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: Config, args: argparse.Namespace) -> int:
    """Ray, the training job and its summary (the run name is claimed and the outputs are writable)."""
    from selfe.console import QuietConsole
    from selfe.storage import ensure_ray
    from selfe.train.job import TrainingFailed, run_training

    console = QuietConsole(os.path.join(args.out, "logs", f"{cfg.train.run_name}.log"), verbose=args.verbose)
    if not args.verbose:
        print(f"[selfe] run {cfg.train.run_name}; Ray's and the libraries' output: {console.log_path} "
              "(--verbose shows it here)", flush=True)
    if os.environ.get("RAY_ADDRESS"):  # a cluster's driver: `ray job submit`, a RayJob, or a shell on the head
        print_job_locations(cfg)
    ensure_ray(args.num_cpus)
    console.attach_ray()
    try:
        with stop_on_sigterm():  # after ray.init, which installs a SIGTERM handler of its own (sys.exit)
            res = run_training(cfg, promote=args.promote, out_root=args.out)
    except TrainingFailed:
        traceback.print_exc(file=console.log)
        raise
    print("\n=== selfe training finished ===")
    fields = [("run name", f"{res.run_name} (re-run with --train.run_name={res.run_name} to resume)"),
              ("steps", f"{res.final_step} in {res.train_seconds:.0f} s of training"),
              ("checkpoint", res.checkpoint_path), ("model folder", res.model_dir)]
    scores = [f"{steps}: {r['overall']:.3f}" + (f" +- {r['overall_se']:.3f}" if r.get("overall_se") is not None else "")
              for steps, r in res.geneval.items() if isinstance(r, dict) and r.get("overall") is not None]
    if scores:
        fields.append(("GenEval-lite", f"{'; '.join(scores)} (steps: overall +- SE)"))
    if res.grid_path:
        fields.append(("sample grid", f"{res.grid_path} (rows: steps {cfg.eval.steps}; prompts in samples.txt)"))
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if res.mlflow_run_id:
        fields.append(("MLflow run", f"{res.mlflow_run_id} at {uri}"))
        if res.model_version is not None:
            champion = ", @champion" if args.promote or cfg.tracking.promote_champion else ""
            fields.append(("registered", f"models:/{cfg.tracking.registered_model}/{res.model_version} "
                                         f"(alias @{cfg.tracking.alias}{champion})"))
        fields.append(("browse", mlflow_ui_hint(uri)))
        if res.model_version is not None:
            fields.append(("generate", f"python pipelines/generate.py --model models:/{cfg.tracking.registered_model}@"
                                       f"{cfg.tracking.alias} --prompt \"a photo of a red circle\" --steps 2 --out red.png"))
    if not args.verbose:
        fields.append(("log file", str(console.log_path)))
    print_fields(fields)
    if res.registration_error:
        fail(f"NOT registered: {res.registration_error}")
        return 1
    return 0


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted entrypoint


def job_locations(cfg: Config, dashboard_url: str, job_config_json: str = "") -> list[str]:
    """Lines that say where a job's MLflow runs and Ray dashboard are (printed before training: a
    submitted job's log is often all its user sees). ``dashboard_url`` as `ray.init` reports it (the
    head's address as the cluster sees it); ``job_config_json``: $RAY_JOB_CONFIG_JSON_ENV_VAR."""
    from selfe.tracking.runs import resolve_tracking_uri

    lines = []
    if dashboard_url:
        url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        submission = json.loads(job_config_json or "{}").get("metadata", {}).get("job_submission_id", "")
        lines.append(f"Ray dashboard:   {url}" + (f" (Jobs tab: {submission})" if submission else ""))
    if not cfg.tracking.enabled:
        return [*lines, "MLflow:          off (tracking.enabled=false)"]
    uri = resolve_tracking_uri(cfg)
    where = " on the node that runs this driver" if uri.startswith("sqlite:") else ""
    return [*lines, f"MLflow UI:       {mlflow_ui_hint(uri)}{where}"]


def mlflow_ui_hint(uri: str) -> str:
    """How to browse the runs at tracking URI ``uri``: a server's own address, else an `mlflow ui`
    command (SQLite and database stores have no UI of their own)."""
    if uri.startswith(("http://", "https://")):
        return uri
    return f"mlflow ui --backend-store-uri {uri}"


def print_job_locations(cfg: Config) -> None:
    """Join the cluster (`selfe.train.job` reuses the connection) and print `job_locations`."""
    from selfe.storage import ensure_ray

    context = ensure_ray()
    dashboard = (context.dashboard_url if context else "") or ""
    for line in job_locations(cfg, dashboard, os.environ.get(RAY_JOB_ENV, "")):
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
