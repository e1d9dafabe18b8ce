"""One builder per cache at a time: a file lock beside a local cache, a conditional put on S3.

Two jobs that need the same cache (a sweep's trials, a resubmitted job) would otherwise build it
together and commit each other's files. The second builder waits; once the first has committed,
it finds a complete cache and does nothing.

Local: ``fcntl.flock`` on ``<cache>.lock``. The kernel drops the lock when its holder dies, so a
killed build never blocks the next one.
S3: ``PUT <cache>.lock`` with ``If-None-Match: *`` succeeds for exactly one writer; the others poll.
A dead holder cannot delete its lock object, so one older than ``stale_s`` is taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone

from selfe.storage import s3_client


class CacheLockTimeout(TimeoutError):
    """Another build of the same cache held the lock for longer than the wait allowed."""


def _owner() -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()


@contextlib.contextmanager
def build_lock(cache_uri: str, endpoint: str = "", timeout_s: float = 6 * 3600, poll_s: float = 2.0,
               stale_s: float = 12 * 3600) -> Iterator[None]:
    """Hold the build lock of the cache at ``cache_uri`` (local path or s3://) for the block."""
    lock_uri = cache_uri.rstrip("/") + ".lock"
    if lock_uri.startswith("s3://"):
        with _s3_lock(lock_uri, endpoint, timeout_s, poll_s, stale_s):
            yield
    else:
        with _file_lock(lock_uri, timeout_s, poll_s):
            yield


@contextlib.contextmanager
def _file_lock(path: str, timeout_s: float, poll_s: float) -> Iterator[None]:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    deadline, waited = time.time() + timeout_s, False
    with open(path, "a+b") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    fh.seek(0)
                    print(f"waiting for another build of this cache to finish (lock {path}: "
                          f"{fh.read().decode(errors='replace') or 'held'})", flush=True)
                    waited = True
                if time.time() > deadline:
                    raise CacheLockTimeout(f"{path} was held for over {timeout_s:.0f} s by another build") from None
                time.sleep(poll_s)
        fh.truncate(0)
        fh.write(_owner())
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _s3_lock(uri: str, endpoint: str, timeout_s: float, poll_s: float, stale_s: float) -> Iterator[None]:
    from botocore.exceptions import ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client = s3_client(endpoint)
    owner, deadline, waited = _owner(), time.time() + timeout_s, False
    while True:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=owner, IfNoneMatch="*")
            break
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            age = (datetime.now(timezone.utc) - head["LastModified"]).total_seconds()
        except ClientError:  # released between our put and our look: try again at once
            continue
        if age > stale_s:
            print(f"taking over the build lock {uri}: held {age / 3600:.1f} h, its builder is presumed dead")
            client.delete_object(Bucket=bucket, Key=key)
            continue
        if not waited:
            print(f"waiting for another build of this cache to finish (lock {uri})", flush=True)
            waited = True
        if time.time() > deadline:
            raise CacheLockTimeout(f"{uri} was held for over {timeout_s:.0f} s by another build")
        time.sleep(poll_s)
    try:
        yield
    finally:
        with contextlib.suppress(ClientError):
            if client.get_object(Bucket=bucket, Key=key)["Body"].read() == owner:  # never delete a taker's lock
                client.delete_object(Bucket=bucket, Key=key)
