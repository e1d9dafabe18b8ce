"""Source readers for the preprocessing job: each returns a Ray Dataset of raw rows.

Rows of the shapes world are already pixels: ``{id, image: uint8 (R, R, 3), caption, spec}``. Every
other source yields encoded bytes for `selfe.data.transforms.decode_batch`:
``{id, image: bytes, caption, spec: "", error}`` where ``error`` names a problem the reader already
found ("missing_image", "bad_metadata", "corrupt_shard", "download_failed"); such rows are counted,
not dropped here.

Locations are local paths or ``s3://bucket/prefix`` (endpoint: ``data.s3_endpoint``, else
``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``). `check_location` runs before any work, so a typo in a
path, a missing bucket or unusable credentials fail in seconds with a message that names them.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from selfe.configtools import ConfigError
from selfe.data.readers import ROWS_PER_BLOCK, byte_table, fetch_files, parquet_byte_rows, read_shards
from selfe.storage import s3_client, s3_endpoint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------- locations


def check_location(uri: str, endpoint: str, what: str, must_exist: bool = True) -> None:
    """Fail now, naming ``uri`` and ``what`` it is, if it cannot be read (or its bucket does not exist).

    Raises:
        FileNotFoundError: the path, bucket or prefix does not exist.
        PermissionError: credentials are missing, unreadable or refused.
        ConnectionError: the S3 endpoint cannot be reached.
    """
    if not uri.startswith("s3://"):
        if must_exist and not os.path.exists(os.path.expanduser(uri)):
            raise FileNotFoundError(f"{what} {uri!r} does not exist (resolved to {os.path.abspath(uri)})")
        return
    _check_s3(uri, s3_endpoint(endpoint), what, must_exist)


def _check_s3(uri: str, endpoint: str, what: str, must_exist: bool) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    where = f"{what} {uri} (endpoint {endpoint or 'AWS default'})"
    for variable in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        path = os.environ.get(variable)
        if path and not os.access(path, os.R_OK):
            raise PermissionError(f"cannot read {where}: ${variable}={path} is not a readable file")
    try:
        session = boto3.session.Session()
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials else None
    except (BotoCoreError, OSError) as err:
        raise PermissionError(f"cannot load AWS credentials to read {where}: {err}") from err
    if frozen is None or not frozen.access_key:
        raise PermissionError(
            f"no AWS credentials found to read {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"(or AWS_PROFILE)"
        )
    client = s3_client(endpoint, session)
    try:
        client.head_bucket(Bucket=bucket)
        if must_exist:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/"), MaxKeys=1)
            if not listing.get("KeyCount"):
                raise FileNotFoundError(f"{where}: no objects under this prefix")
    except EndpointConnectionError as err:
        raise ConnectionError(f"cannot reach the S3 endpoint for {where}: {err}") from err
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist: {where}") from err
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(f"the AWS credentials may not read {where} ({code})") from err
        raise


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Every file under ``path`` (or ``path`` itself if it is a file), sorted, hidden names skipped."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.source {path!r} does not exist")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and not any(p.startswith(".") for p in _rel(i.path, path).split("/"))
    )


def _rel(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


def detect_format(files: list[str]) -> str:
    """"img2dataset", "parquet", "webdataset" or "imagefolder" from the file names under a source.

    img2dataset folders come first: their webdataset output also holds metadata-only ``.parquet`` files."""
    from selfe.data.img2dataset import is_img2dataset

    if is_img2dataset(files):
        return "img2dataset"
    if any(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(f.endswith(".tar") for f in files):
        return "webdataset"
    return "imagefolder"


def _blocks(n: int) -> int:
    return max(1, min(n, math.ceil(n / ROWS_PER_BLOCK)))


# ---------------------------------------------------------------- the shapes world


def shapes_blocks(num_samples: int) -> int:
    """Blocks ``shapes_dataset`` renders: each goes whole to one encoder actor."""
    return math.ceil(num_samples / ROWS_PER_BLOCK)


def shapes_dataset(cfg: Any) -> Any:
    """``data.num_samples`` scenes rendered in parallel; row ``i`` depends only on (seed, i).

    With a CPU-only encoder pool (``data.encode_cpus`` set, no ``encode_gpus``: the planned pool) the
    render asks for the actors' own resources, so Ray Data fuses it into the encoder actors: each renders
    a block and encodes it, instead of waiting for render tasks that compete for the same cores (on
    2 cores the separate render tasks left the actors idle ~9% of the steady span; docs/benchmarks.md).
    A GPU actor would idle while it rendered: there the render stays in ``decode_cpus`` tasks.
    """
    import ray.data

    data = cfg.data
    n = data.num_samples
    # Scene indices as in-memory blocks rather than `ray.data.range`: no read task holding a whole CPU. One
    # row per scene, not one per range: a fused operator bundles its input up to the encoder's batch size
    # in rows, which would hand every range to one actor.
    blocks = [np.arange(s, min(s + ROWS_PER_BLOCK, n), dtype=np.int64) for s in range(0, n, ROWS_PER_BLOCK)]
    in_encoders = data.encode_cpus is not None and not data.encode_gpus
    return ray.data.from_numpy(blocks).map_batches(
        _render_shapes,
        batch_size=None,  # a whole block per call
        num_cpus=data.encode_cpus if in_encoders else data.decode_cpus,
        fn_kwargs={"seed": cfg.data.seed, "resolution": cfg.data.resolution, "task_weights": dict(cfg.data.task_weights)},
    )


def _render_shapes(batch: dict[str, np.ndarray], seed: int, resolution: int, task_weights: dict) -> dict:
    """Render the scenes whose indices are ``batch["data"]`` (int64 (B,))."""
    from PIL import Image

    from selfe.data.shapes import ShapesConfig, generate_one, spec_to_json
    from selfe.data.transforms import resize_center_crop

    # The renderer needs >= 32 px to keep shapes classifiable; smaller caches are downscaled renders.
    shapes_cfg = ShapesConfig(resolution=max(resolution, 32), **({"task_weights": task_weights} if task_weights else {}))
    ids, images, captions, specs = [], [], [], []
    for index in (int(i) for i in batch["data"]):
        image, caption, spec = generate_one(index, seed, shapes_cfg)
        if image.shape[0] != resolution:
            image = resize_center_crop(Image.fromarray(image), resolution)
        ids.append(f"shapes:{index}")
        images.append(image)
        captions.append(caption)
        specs.append(spec_to_json(spec))
    return {
        "id": np.array(ids, dtype=object),
        "image": np.stack(images),
        "caption": np.array(captions, dtype=object),
        "spec": np.array(specs, dtype=object),
    }


# ---------------------------------------------------------------- encoded-image sources


def byte_source_dataset(cfg: Any, fs: pafs.FileSystem, root: str, files: list[str], source_format: str) -> Any:
    """Rows ``{id, image: bytes, caption, spec, error}`` of an imagefolder, WebDataset, Parquet or
    img2dataset source."""
    import ray.data

    if source_format == "img2dataset":
        from selfe.data.img2dataset import img2dataset_dataset

        return img2dataset_dataset(cfg, fs, root, files)
    if source_format == "imagefolder":
        rows = imagefolder_rows(fs, root, files, cfg.data.caption_column)
        if not rows:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under data.source {cfg.data.source!r}")
        return ray.data.from_items(rows, override_num_blocks=_blocks(len(rows))).map_batches(
            fetch_files, batch_size=64, num_cpus=cfg.data.decode_cpus, fn_kwargs={"fs": fs}
        )
    if source_format == "webdataset":
        shards = [f for f in files if f.endswith(".tar")]
        if not shards:
            raise FileNotFoundError(f"no .tar shards under data.source {cfg.data.source!r}")
        # Not ray.data.read_webdataset: a truncated tar fails its read task, and with it the job (Ray 2.60;
        # tests/test_img2dataset.py checks it); read_shards keeps the samples before the cut and counts the shard.
        items = [{"shard": s, "name": _rel(s, root)} for s in shards]
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_shards, batch_size=1, num_cpus=cfg.data.decode_cpus, fn_kwargs={"fs": fs, "caption_key": cfg.data.caption_column}
        )
    if source_format == "parquet":
        tables = [f for f in files if f.endswith(".parquet")]
        if not tables:
            raise FileNotFoundError(f"no .parquet files under data.source {cfg.data.source!r}")
        _check_parquet_columns(fs, tables[0], cfg.data.image_column, cfg.data.caption_column)
        kwargs = {"image_column": cfg.data.image_column, "caption_column": cfg.data.caption_column, "root": root}
        return parquet_byte_rows(fs, tables, [cfg.data.image_column, cfg.data.caption_column], _parquet_rows, kwargs,
                                 cfg.data.decode_cpus)
    raise ValueError(f"unknown data.source_format {source_format!r}")


def imagefolder_rows(fs: pafs.FileSystem, root: str, files: list[str], caption_key: str) -> list[dict]:
    """One row per image (and per unusable metadata line) of a Hugging Face imagefolder.

    Captions come from ``metadata.jsonl`` (``file_name`` relative to the metadata file's folder, the
    caption under ``caption_key``), else from a sidecar ``<image stem>.txt``.
    """
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    image_set, file_set = set(images), set(files)
    captions: dict[str, str] = {}
    rows: list[dict] = []
    for meta in (f for f in files if posixpath.basename(f) == "metadata.jsonl"):
        folder = posixpath.dirname(meta)
        with fs.open_input_stream(meta) as stream:
            lines = stream.read().decode("utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name = record["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                rows.append(_row(f"{_rel(meta, root)}:{number}", error="bad_metadata"))
                continue
            path = posixpath.normpath(posixpath.join(folder, str(name)))
            caption = record.get(caption_key)
            if path not in image_set:
                rows.append(_row(_rel(path, root), error="missing_image"))
                continue
            captions[path] = caption if isinstance(caption, str) else ""
    for image in images:
        sidecar = posixpath.splitext(image)[0] + ".txt"
        if image in captions:
            rows.append(_row(_rel(image, root), path=image, caption=captions[image]))
        else:
            rows.append(_row(_rel(image, root), path=image, caption_path=sidecar if sidecar in file_set else ""))
    return rows


def _row(row_id: str, path: str = "", caption: str = "", caption_path: str = "", error: str = "") -> dict:
    return {"id": row_id, "path": path, "caption": caption, "caption_path": caption_path, "error": error}


def read_task_cpus(source_format: str, decode_cpus: float) -> float:
    """CPUs the largest read task of ``source_format`` reserves: ``ray.data.read_parquet`` lists and samples
    its files in a 1-CPU task (Parquet sources and img2dataset's tables both read through
    ``parquet_byte_rows``); every other read, decode and write task asks for ``decode_cpus``."""
    return max(decode_cpus, 1.0 if source_format in ("parquet", "img2dataset") else 0.0)


def _check_parquet_columns(fs: pafs.FileSystem, path: str, image_column: str, caption_column: str) -> None:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as handle:
        names = pq.read_schema(handle).names
    missing = [c for c in (image_column, caption_column) if c not in names]
    if missing:
        raise ConfigError(
            f"Parquet source {path} has no column(s) {missing}; its columns are {names}. "
            f"Set data.image_column / data.caption_column"
        )


def _parquet_rows(table: pa.Table, image_column: str, caption_column: str, root: str) -> pa.Table:
    column = table.column(image_column).combine_chunks()
    if pa.types.is_struct(column.type):  # Hugging Face Image feature: {bytes, path}
        column = column.field("bytes")
    images = [b or b"" for b in column.to_pylist()]
    captions = [c if isinstance(c, str) else "" for c in table.column(caption_column).to_pylist()]
    paths = table.column("path").to_pylist()
    ids = [f"{_rel(p, root)}:{zlib.crc32(img) ^ zlib.crc32(c.encode()):08x}" for p, img, c in zip(paths, images, captions)]
    return byte_table(ids, images, captions, ["" if img else "missing_image" for img in images])
