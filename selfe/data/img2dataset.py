"""img2dataset output folders as a preprocessing source (``data.source_format = "img2dataset"``).

img2dataset (github.com/rom1504/img2dataset) writes numbered shards, ``{shard:05d}`` by default, and
one ``<shard>_stats.json`` per shard. Two of its output formats are read here:

- ``--output_format parquet``: ``<shard>.parquet`` with one row per input URL: ``key``, ``url``,
  ``caption``, ``status``, ``error_message``, sizes, and the image bytes in ``jpg`` (``png``/``webp``
  with another ``--encode_format``; null when the download failed).
- ``--output_format webdataset``: ``<shard>.tar`` holding only the downloaded samples
  (``<key>.jpg``, ``<key>.txt`` caption, ``<key>.json`` metadata) plus a sidecar ``<shard>.parquet``
  with the metadata of every row, failed ones included (no image column).

Rows whose ``status`` is not ``"success"`` become ``download_failed`` rows: counted in the manifest
like every other skipped row, not silently missing. ``data.image_column`` / ``data.caption_column``
do not apply: the columns are img2dataset's own.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from selfe.configtools import ConfigError
from selfe.data.readers import byte_table, parquet_byte_rows, read_shards

DOWNLOAD_FAILED = "download_failed"
IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg")
CAPTION_COLUMNS = ("txt", "caption")
_STATS = re.compile(r"^\d+_stats\.json$")
_SHARD = re.compile(r"^\d+\.(tar|parquet)$")


def is_img2dataset(files: list[str]) -> bool:
    """True when ``files`` hold img2dataset shards: ``<n>_stats.json`` beside ``<n>.tar``/``<n>.parquet``."""
    names = [posixpath.basename(f) for f in files]
    return any(_STATS.match(n) for n in names) and any(_SHARD.match(n) for n in names)


def img2dataset_dataset(cfg: Any, fs: pafs.FileSystem, root: str, files: list[str]) -> Any:
    """Rows ``{id, image: bytes, caption, spec, error}`` of an img2dataset output folder (see module doc)."""
    import ray.data


    tars = [f for f in files if _SHARD.match(posixpath.basename(f)) and f.endswith(".tar")]
    tables = [f for f in files if _SHARD.match(posixpath.basename(f)) and f.endswith(".parquet")]
    if not tables:
        raise FileNotFoundError(f"img2dataset folder {cfg.data.source!r} has no <shard>.parquet files")
    names = _schema_names(fs, tables[0])
    kwargs = {"root": root, "num_cpus": cfg.data.decode_cpus}
    if not tars:
        image = next((c for c in IMAGE_COLUMNS if c in names), None)
        caption = next((c for c in CAPTION_COLUMNS if c in names), None)
        if image is None or caption is None or "status" not in names:
            raise ConfigError(
                f"img2dataset folder {cfg.data.source!r}: {tables[0]} has no image ({'/'.join(IMAGE_COLUMNS)}), "
                f"caption ({'/'.join(CAPTION_COLUMNS)}) or status column (its columns are {names}). Only the "
                f"parquet and webdataset output formats are read; for --output_format files use "
                f"--data.source_format=imagefolder"
            )
        return _parquet_shards(fs, tables, [image, caption], **kwargs)
    # Tars hold only the downloaded samples; the failures are in the sidecar tables. The tars go through
    # selfe's own streaming reader, not ray.data.read_webdataset: a truncated shard makes read_webdataset's
    # read task raise tarfile.ReadError ("unexpected end of data") and fail the job (checked with Ray 2.60,
    # tests/test_img2dataset.py), while ours keeps the samples before the cut and counts one corrupt_shard.
    items = [{"shard": s, "name": posixpath.relpath(s, root)} for s in tars]
    downloaded = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_shards, batch_size=1, num_cpus=cfg.data.decode_cpus, fn_kwargs={"fs": fs, "caption_key": "caption"}
    )
    return downloaded.union(_parquet_shards(fs, tables, [], **kwargs))


def _schema_names(fs: pafs.FileSystem, path: str) -> list[str]:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as handle:
        return pq.read_schema(handle).names


def _parquet_shards(fs: pafs.FileSystem, tables: list[str], columns: list[str], root: str, num_cpus: float) -> Any:
    """Ray Dataset of byte rows from img2dataset tables; ``columns`` = [image, caption], or [] for
    webdataset sidecars, of which only the failed rows are kept (the tars hold the others)."""
    image, caption = columns or ("", "")
    kwargs = {"image_column": image, "caption_column": caption, "root": root, "failed_only": not columns}
    return parquet_byte_rows(fs, tables, ["key", "status", *columns], parquet_rows, kwargs, num_cpus)


def parquet_rows(
    table: pa.Table, image_column: str, caption_column: str, root: str, failed_only: bool = False
) -> pa.Table:
    """img2dataset table rows -> byte rows; ``status != "success"`` -> error ``download_failed``.

    Empty ``image_column``/``caption_column`` (a webdataset sidecar): rows carry no image or caption;
    ``failed_only`` keeps only the ``download_failed`` rows."""
    n = table.num_rows
    keys = [str(k) for k in table.column("key").to_pylist()]
    paths = table.column("path").to_pylist()
    status = table.column("status").to_pylist()
    images = [b or b"" for b in table.column(image_column).to_pylist()] if image_column else [b""] * n
    captions = table.column(caption_column).to_pylist() if caption_column else [""] * n
    errors = [
        DOWNLOAD_FAILED if s != "success" else ("" if img else "missing_image") for s, img in zip(status, images)
    ]
    rows = byte_table([f"{posixpath.relpath(p, root)}:{k}" for p, k in zip(paths, keys)], images,
                      [c if isinstance(c, str) else "" for c in captions], errors)
    return rows.filter(pa.array([e == DOWNLOAD_FAILED for e in errors], pa.bool_())) if failed_only else rows
