"""What a pipeline's console shows: selfe's own story, with everything else in a log file.

A Ray job's console is the driver's stdout and stderr plus the output Ray forwards from every worker,
actor and task (Ray Data's progress dumps, Train's controller and placement-group messages, model
loading bars, deprecation warnings, the C++ core worker's error lines). ``QuietConsole`` keeps the
console for the lines selfe prints itself (the driver's own prints and the workers' ``[selfe]`` lines)
and for Python errors, and sends the rest to a log file whose path the run prints:

- C-level writes to file descriptor 2 (the core worker's ``core_worker.cc`` lines) go to the file;
  Python's ``sys.stderr`` stays on the console, so errors and tracebacks are still seen;
- the Python loggers of Ray, MLflow and the model libraries, and ``warnings``, go to the file;
- worker output forwarded by Ray, and the raylet's messages, go to the file; of it, only stdout lines
  that start with ``[selfe]`` reach the console's stdout (Ray Train writes a worker's prints to both
  its stdout and stderr, which printed every progress line twice);
- Hugging Face and MLflow progress bars are off (set before the libraries are imported, and
  inherited by the local Ray's processes).

``verbose=True`` leaves every stream as it was. The same holds under ``ray job submit``: there the
driver's console is the job's log.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

SELFE_PREFIX = "[selfe]"
NOISY_LOGGERS = ("ray", "mlflow", "alembic", "transformers", "sentence_transformers", "huggingface_hub",
                 "urllib3", "filelock", "torch._dynamo", "torch._inductor", "py.warnings")
"""Loggers whose records go to the log file only (their errors too: the driver reports failures itself)."""
_RAY_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives its worker-output printer


class QuietConsole:
    """Route everything but selfe's own lines to ``log_path`` (see the module docstring)."""

    def __init__(self, log_path: str | Path, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.log: TextIO | None = None
        if verbose:
            return
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        sys.stdout.flush()
        sys.stderr.flush()
        console_fd = os.dup(2)
        os.dup2(self.log.fileno(), 2)
        sys.stderr = open(console_fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)
        logging.captureWarnings(True)
        self._handler = logging.StreamHandler(self.log)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.route_loggers()

    def route_loggers(self) -> None:
        """Point the noisy loggers at the log file (again: ``ray.init`` installs its own handlers)."""
        if self.verbose:
            return
        try:  # MLflow configures its logger when first imported: import it now, then reroute
            import mlflow  # noqa: F401
        except ImportError:
            pass
        for name in NOISY_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers = [self._handler]
            logger.propagate = False
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)

    def attach_ray(self) -> bool:
        """After ``ray.init``: filter the worker output Ray forwards to this driver. Returns False (and
        leaves Ray's printer in place) when this Ray has no such hook."""
        if self.verbose:
            return False
        self.route_loggers()
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # a Ray without the private dispatcher: keep its printer, say so in the log
            self.log.write("selfe: this Ray version has no worker-output dispatcher; its output stays on the console\n")
            return False
        import ray._private.worker as ray_worker

        dispatcher.remove_handler(_RAY_PRINT_HANDLER)
        dispatcher.add_handler(_RAY_PRINT_HANDLER, self._worker_output)
        # The raylet's messages to the driver (worker-pool warnings, OOM kills) bypass the dispatcher.
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: self._worker_output(data)
        return True

    def _worker_output(self, data: dict) -> None:
        """One batch of forwarded lines: ``{"pid", "actor_name"/"task_name", "is_err", "lines"}``."""
        who = data.get("actor_name") or data.get("task_name") or ""
        tag = f"({who} pid={data.get('pid')}{' stderr' if data.get('is_err') else ''}) "
        for line in data.get("lines", []):
            self.log.write(tag + line + "\n")
            if not data.get("is_err") and line.startswith(SELFE_PREFIX):
                sys.stdout.write(line + "\n")
        sys.stdout.flush()
