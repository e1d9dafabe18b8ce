"""Readers of encoded images: the byte rows every non-shapes source yields (``byte_table``), read from
files one by one, from Parquet tables or streamed from WebDataset tar shards.

A byte row is ``{id, image: bytes, caption, spec: "", error}``; ``error`` names a problem found while
reading ("missing_image", "corrupt_shard") so the row is counted, not dropped
(`selfe.data.transforms.decode_batch` decodes the rest). Used by `selfe.data.sources` and
`selfe.data.img2dataset`, which decide what to read.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ROWS_PER_BLOCK = 256
"""Rows per block a shard reader yields."""


def fetch_files(batch: dict[str, np.ndarray], fs: pafs.FileSystem) -> dict[str, np.ndarray]:
    """Read each row's image bytes (and sidecar caption) from ``fs``."""
    images, captions, errors = [], [], []
    for path, caption, caption_path, error in zip(batch["path"], batch["caption"], batch["caption_path"], batch["error"]):
        data = b""
        if not error:
            try:
                with fs.open_input_stream(path) as stream:
                    data = stream.read()
                if caption_path:
                    with fs.open_input_stream(caption_path) as stream:
                        caption = stream.read().decode("utf-8", errors="replace")
            except FileNotFoundError:
                error = "missing_image"
        images.append(data)
        captions.append(caption or "")
        errors.append(error or "")
    return byte_rows(list(batch["id"]), images, captions, errors)


def parquet_byte_rows(fs: pafs.FileSystem, tables: list[str], columns: list[str], to_rows: Any, fn_kwargs: dict,
                      num_cpus: float) -> Any:
    """Ray Dataset of Parquet ``tables``' ``columns`` (plus ``path``), turned into byte rows by
    ``to_rows(table, **fn_kwargs)`` (``byte_table``'s columns)."""
    import ray.data

    ds = ray.data.read_parquet(tables, filesystem=fs, include_paths=True, partitioning=None, num_cpus=num_cpus)
    return ds.select_columns([*columns, "path"]).map_batches(to_rows, batch_format="pyarrow", num_cpus=num_cpus,
                                                             fn_kwargs=fn_kwargs)


def byte_table(ids: list[str], images: list[bytes], captions: list[str], errors: list[str]) -> pa.Table:
    """The byte-row columns every source yields: {id, image, caption, spec, error}, as Arrow."""
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "image": pa.array(images, type=pa.binary()),
        "caption": pa.array(captions, pa.string()),
        "spec": pa.array([""] * len(ids), pa.string()),
        "error": pa.array(errors, pa.string()),
    })


def byte_rows(ids: list, images: list[bytes], captions: list[str], errors: list[str]) -> dict[str, np.ndarray]:
    return {
        "id": np.array([str(i) for i in ids], dtype=object),
        "image": np.array(images, dtype=object),
        "caption": np.array(captions, dtype=object),
        "spec": np.array([""] * len(ids), dtype=object),
        "error": np.array(errors, dtype=object),
    }


def read_shards(batch: dict[str, np.ndarray], fs: pafs.FileSystem, caption_key: str) -> Iterator[dict]:
    """Stream each WebDataset tar; group members by key (path up to the first dot of the file name)."""
    for shard, name in zip(batch["shard"], batch["name"]):
        pending: list[tuple[str, bytes, str, str]] = []
        try:
            for key, members in _tar_samples(fs, str(shard)):
                pending.append(_wds_sample(f"{name}/{key}", members, caption_key))
                if len(pending) == ROWS_PER_BLOCK:
                    yield byte_rows(*map(list, zip(*pending)))
                    pending = []
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            # The sample being read when the shard broke is lost with it; the shard is counted once.
            pending.append((f"{name}:unreadable-after-{len(pending)}-samples", b"", "", "corrupt_shard"))
        if pending:
            yield byte_rows(*map(list, zip(*pending)))


def _tar_samples(fs: pafs.FileSystem, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    with fs.open_input_stream(shard) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            if base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            member_key = posixpath.join(folder, stem)
            if member_key != key and members:
                yield key, members
                members = {}
            key = member_key
            members[ext.lower()] = tar.extractfile(member).read()
        if members:
            yield key, members


def _wds_sample(row_id: str, members: dict[str, bytes], caption_key: str) -> tuple[str, bytes, str, str]:
    image = next((members[e] for e in WDS_IMAGE_EXTENSIONS if e in members), None)
    caption = ""
    if "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace")
    elif "json" in members:
        try:
            value = json.loads(members["json"]).get(caption_key)
            caption = value if isinstance(value, str) else ""
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            caption = ""
    return row_id, image or b"", caption, "" if image is not None else "missing_image"
