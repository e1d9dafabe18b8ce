"""One job per run name at a time: an owner marker in the run's storage folder.

Two jobs started with the same ``train.run_name`` would share one storage folder, resume from each
other's checkpoints and delete them (``keep_checkpoints``). The first job creates
``<storage>/<run>/.selfe-owner.json`` exclusively (``O_EXCL`` locally, ``If-None-Match: *`` on S3) and
refreshes its heartbeat; a second job refuses to start while the owner is alive. A marker left by a
dead job is taken over: at once when it names a process of this host that no longer exists
(a killed driver resubmitted on the same machine), else once its heartbeat is ``stale_s`` old.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

MARKER = ".selfe-owner.json"
_HELD: dict[str, int] = {}
"""Markers this process holds, with how many ``run_owner`` blocks hold each (re-entrance)."""


class RunInUseError(RuntimeError):
    """Another live job owns this run name."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Store:
    """Create-if-absent, read, overwrite and delete of one small object, locally or on S3."""

    def __init__(self, uri: str, endpoint: str = "") -> None:
        self.uri = uri
        if uri.startswith("s3://"):
            from selfe.storage import s3_client

            self.bucket, _, self.key = uri.removeprefix("s3://").partition("/")
            self.s3 = s3_client(endpoint)
        else:
            self.s3 = None
            os.makedirs(os.path.dirname(uri), exist_ok=True)

    def create(self, body: bytes) -> bool:
        if self.s3 is None:
            try:
                fd = os.open(self.uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            return True
        from botocore.exceptions import ClientError

        try:
            self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def read(self) -> dict | None:
        try:
            if self.s3 is None:
                with open(self.uri, "rb") as fh:
                    return json.loads(fh.read())
            return json.loads(self.s3.get_object(Bucket=self.bucket, Key=self.key)["Body"].read())
        except (FileNotFoundError, ValueError):
            return None
        except Exception as e:  # noqa: BLE001 - botocore's NoSuchKey
            if "NoSuchKey" in type(e).__name__ or "404" in str(e):
                return None
            raise

    def write(self, body: bytes) -> None:
        if self.s3 is None:
            tmp = f"{self.uri}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, self.uri)
        else:
            self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=body)

    def delete(self) -> None:
        if self.s3 is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.uri)
        else:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key)


def _stale(owner: dict, stale_s: float) -> bool:
    if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
        return True
    return time.time() - float(owner.get("heartbeat", 0)) > stale_s


@contextlib.contextmanager
def run_owner(run_uri: str, run_name: str, endpoint: str = "", heartbeat_s: float = 30.0,
              stale_s: float = 180.0) -> Iterator[None]:
    """Own ``run_uri`` (the run's storage folder, local or s3://) for the block, or raise RunInUseError.
    A block inside another that owns the same run in this process owns it already."""
    uri = f"{run_uri.rstrip('/')}/{MARKER}"
    if uri in _HELD:
        _HELD[uri] += 1
        try:
            yield
        finally:
            _HELD[uri] -= 1
        return
    store = _Store(uri, endpoint)
    token = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"

    def body() -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                           "heartbeat": time.time()}).encode()

    for _ in range(3):
        if store.create(body()):
            break
        owner = store.read()
        if owner is not None and not _stale(owner, stale_s):
            age = time.time() - float(owner.get("heartbeat", 0))
            raise RunInUseError(
                f"run {run_name!r} is in use by another job (host {owner.get('host')}, pid {owner.get('pid')}, "
                f"heartbeat {age:.0f} s ago): wait for it to end or use another train.run_name. If that job is "
                f"dead, its marker {store.uri} expires {stale_s:.0f} s after its last heartbeat"
            )
        store.delete()  # a dead job's marker (or one deleted meanwhile): take it over
    else:
        raise RunInUseError(f"could not take ownership of run {run_name!r} ({store.uri}): another job keeps taking it")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            with contextlib.suppress(Exception):  # a missed heartbeat only shortens the takeover delay
                if (store.read() or {}).get("token") == token:
                    store.write(body())

    thread = threading.Thread(target=beat, name="run-owner-heartbeat", daemon=True)
    thread.start()
    _HELD[uri] = 1
    try:
        yield
    finally:
        del _HELD[uri]
        stop.set()
        thread.join(5)
        with contextlib.suppress(Exception):
            if (store.read() or {}).get("token") == token:
                store.delete()
