"""Where bytes live and where compute starts, resolved in one place.

- S3: the endpoint (``data.s3_endpoint``, else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``), the
  pyarrow filesystem for a path and boto3 clients. Credentials are never stored: each process
  resolves them through the AWS chain of its own node (environment, profile, instance role).
- Ray Train's storage path for checkpoints.
- Whether an output location can be written, checked before any work (``check_writable``).
- Ray itself: join the cluster when there is one, else start a local instance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


def s3_endpoint(configured: str = "") -> str:
    """The S3 endpoint URL to use: the configured one, else the standard AWS environment variables."""
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def s3_client(endpoint: str = "", session: Any = None) -> Any:
    """A boto3 S3 client for ``s3_endpoint(endpoint)``. A fresh session by default: it reads the
    credentials now (the default session caches its first lookup) and is not shared between threads."""
    import boto3

    return (session or boto3.session.Session()).client("s3", endpoint_url=s3_endpoint(endpoint) or None)


def filesystem_for(uri: str, endpoint: str = "") -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or an ``s3://`` URI."""
    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    path = uri.removeprefix("s3://").rstrip("/")
    endpoint = s3_endpoint(endpoint)
    if not endpoint:
        fs, _ = pafs.FileSystem.from_uri(uri)  # resolves the bucket's region on AWS
        return fs, path
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # Delayed open sends objects below the part size as one PUT instead of a multipart upload: fewer
    # round trips, and moto (5.x) answers CompleteMultipartUpload with a body the AWS C++ SDK rejects.
    fs = pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme, region=region, allow_delayed_open=True)
    return fs, path


def train_storage(storage_path: str, endpoint: str = "", resolve_uri: bool = False) -> tuple[str, pafs.FileSystem | None]:
    """A storage path as Ray Train's / Tune's RunConfig wants it: (path, storage_filesystem).

    Local paths become absolute. ``s3://`` on an S3-compatible store (an endpoint is set) gets an
    explicit pyarrow filesystem and a bucket-relative path; on AWS S3 (and other URIs) Ray resolves
    the URI itself, unless ``resolve_uri`` asks for the filesystem anyway (``Tuner.can_restore``).
    The filesystem carries no keys: whoever unpickles it (the Train controller, workers, a restored
    Tuner) resolves credentials on its own node, so no secret lands in pickled run state such as
    Tune's ``tuner.pkl`` in the sweep bucket."""
    if storage_path.startswith("s3://") and s3_endpoint(endpoint):
        fs, _ = filesystem_for(storage_path, endpoint)
        return storage_path.removeprefix("s3://").rstrip("/"), fs
    if "://" not in storage_path:
        return str(Path(storage_path).resolve()), None
    if resolve_uri:
        fs, path = pafs.FileSystem.from_uri(storage_path)
        return path.rstrip("/"), fs
    return storage_path, None


class NotWritable(ValueError):
    """An output location this process cannot write; the message names the setting and the fix."""


def check_writable(location: str, setting: str, endpoint: str = "") -> None:
    """Fail now, naming ``setting``, when the folder ``location`` (local or ``s3://``) cannot be
    written, instead of after the work whose results it would hold. A local folder is created, as the
    run would create it; a probe file (object) is written there and removed. Other URI schemes are
    left to their first write.

    Raises:
        NotWritable: with the reason (read-only file system, permission, a file in the way, missing
            credentials, no such bucket).
    """
    probe = f".selfe-write-check-{os.getpid()}"
    if location.startswith("s3://"):
        _check_s3_writable(location, setting, endpoint, probe)
        return
    if "://" in location:
        return
    path = Path(location).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / probe).write_bytes(b"")
        (path / probe).unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            reason = "a file is in the way of the folder"
        raise NotWritable(f"{setting} = {location}: cannot write there ({reason}); give a folder this user can "
                          "write") from None


def _check_s3_writable(location: str, setting: str, endpoint: str, probe: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    key = f"{prefix.rstrip('/')}/{probe}".lstrip("/")
    client = s3_client(endpoint)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    except (ClientError, BotoCoreError) as e:
        code = e.response.get("Error", {}).get("Code", "") if isinstance(e, ClientError) else type(e).__name__
        raise NotWritable(f"{setting} = {location}: cannot write there ({code or e}; endpoint "
                          f"{s3_endpoint(endpoint) or 'AWS default'}); check the bucket name and this account's "
                          "s3:PutObject permission") from None
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError):
        pass  # allowed to write but not to delete: the empty probe object stays, nothing else is touched


def ensure_ray(num_cpus: int | None = None, **init_kwargs):
    """Connect to the cluster when one is there (``RAY_ADDRESS``, set inside ``ray job submit``), else
    start a local Ray with ``num_cpus`` CPUs (default: all) and ``init_kwargs`` for ``ray.init``.
    Returns ``ray.init``'s context (its ``dashboard_url``), or None when Ray was already up.

    A local Ray starts its workers at niceness 0 instead of Ray's 15 (``RAY_worker_niceness``, unless
    set): on a small machine the training step shares the cores with Ray's own processes, and at 15 the
    raylet, GCS and driver (niceness 0) preempt it whenever they wake; its two OpenMP threads then stall
    together. On 2 cores the Ray Train step ran at 0.83-0.87x the plain loop at 15 and at a median of
    1.01x over nine rounds at 0 (docs/benchmarks.md)."""
    import ray

    if ray.is_initialized():
        return None
    if os.environ.get("RAY_ADDRESS"):
        return ray.init(**init_kwargs)
    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet this ray.init starts
    return ray.init(num_cpus=num_cpus, include_dashboard=False, **init_kwargs)
