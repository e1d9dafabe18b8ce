"""The versioned Parquet cache that training reads: key, layout, manifest, build and load.

Layout of one cache, ``<data.cache_root>/<cache_key(cfg)>/`` (a local folder or an ``s3://`` prefix)::

    builds/<build id>/data/*.parquet         latent f16 (C, h, w) | text_tokens f16 (L, D) | text_mask
                                             bool (L,) | text_pooled f16 (Dp,) | caption str | spec str
    builds/<build id>/null_text.safetensors  the text encoder's embedding of "" (tokens, mask, pooled)
    manifest.json                            written last: the commit; lists the build's files, sizes, sha256

Each build writes into its own folder, under a lock (``selfe.data.cachelock``), and commits by
writing the manifest, which names only that build's files and their sizes and sha256. A concurrent
or interrupted build never adds rows to a committed cache; a hit checks every listed file's size and
(``data.verify_cache="sha256"``) content, so a truncated or corrupted file means a rebuild. A forced
rebuild leaves the previous build readable for ``SUPERSEDED_KEEP_S`` (jobs may still be reading
it); later builds delete it, and delete interrupted builds at once.

The key hashes everything that changes the rows (source, resolution, codecs and their weights,
``max_tokens``, ...) but not how the job runs (batch size, actor count). It hashes the source's
*location*, not its contents: after changing files in place, rebuild with ``force=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from selfe.config import Config
from selfe.core.types import TextCond
from selfe.data.cachekey import FORMAT_VERSION, cache_dir, cache_key
from selfe.data.contract import TEXT_FIELDS, latent_shape, manifest_columns
from selfe.data.cachelock import build_lock
from selfe.data.integrity import damaged_files, fingerprint
from selfe.data.pool import cluster_encoder_pool
from selfe.data.sources import (
    byte_source_dataset,
    check_location,
    detect_format,
    list_files,
    shapes_dataset,
)
from selfe.data.transforms import EncodeBatch, Ledger, build_encoders, decode_batch, encode_throughput, encoder_info
from selfe.storage import ensure_ray, filesystem_for

MANIFEST = "manifest.json"
NULL_TEXT = "null_text.safetensors"
DATA_DIR = "data"
BUILDS_DIR = "builds"
SUPERSEDED_KEEP_S = 24 * 3600
"""How long a build replaced by a forced rebuild stays readable for jobs that started on it."""
_TARGET_FILE_BYTES = 64 << 20

log = logging.getLogger(__name__)


class CacheMismatchError(ValueError):
    """A cache was built for a different model/encoder configuration than the one training uses."""


# ---------------------------------------------------------------- reading


def read_manifest(path: str, endpoint: str = "") -> dict:
    """The manifest of the cache at ``path``.

    Raises:
        FileNotFoundError: there is no manifest, i.e. the cache was never built or its build was interrupted.
    """
    fs, root = filesystem_for(path, endpoint)
    manifest_path = posixpath.join(root, MANIFEST)
    if fs.get_file_info(manifest_path).type != pafs.FileType.File:
        raise FileNotFoundError(
            f"{path} is not a complete cache: {MANIFEST} is missing (the build never ran or was interrupted). "
            f"Build it with `python pipelines/preprocess.py` and the training config"
        )
    with fs.open_input_stream(manifest_path) as stream:
        return json.loads(stream.read())


def read_null_text(path: str, endpoint: str = "") -> TextCond:
    """The embedding of "" stored with the cache: tokens (1, L, D) f32, mask (1, L) bool, pooled (1, Dp) f32."""
    from safetensors.torch import load

    manifest = read_manifest(path, endpoint)  # a half-built cache has no trustworthy null embedding
    fs, root = filesystem_for(path, endpoint)
    with fs.open_input_stream(posixpath.join(root, manifest["null_text"])) as stream:
        tensors = load(stream.read())
    return TextCond(*(tensors[f] for f in TEXT_FIELDS))


def validate_manifest(manifest: dict, cfg: Config, path: str = "cache") -> None:
    """Raise `CacheMismatchError` listing every way the cache disagrees with the training config."""
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{path} has cache format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}: rebuild it"
        )
    text = manifest["text_encoder"]
    checks = [
        ("resolution", manifest["resolution"], cfg.data.resolution, "data.resolution"),
        ("latent channels", latent_shape(manifest)[0], cfg.model.in_channels, "model.in_channels"),
        ("text width", text["width"], cfg.model.text_width, "model.text_width"),
        ("pooled text width", text["pooled_width"], cfg.model.pooled_width, "model.pooled_width"),
        ("max tokens", text["max_tokens"], cfg.text.max_tokens, "text.max_tokens"),
        ("codec kind", manifest["codec"]["kind"], cfg.codec.kind, "codec.kind"),
    ]
    problems = [f"  {what}: cache has {have!r}, config has {key}={want!r}" for what, have, want, key in checks if have != want]
    if cfg.objective.fake_score and "fake_tokens" not in manifest["columns"]:
        problems.append("  fake-prompt columns: the cache has none, config has objective.fake_score=true "
                        "(rebuild the cache with objective.fake_score=true)")
    if problems:
        raise CacheMismatchError(
            f"cache {path} does not match the training config:\n" + "\n".join(problems) + "\n"
            "Rebuild the cache with this config (`python pipelines/preprocess.py --config ...`) or fix the config."
        )


def load_cache(path: str, cfg: Config) -> Any:
    """The cache's rows as a Ray Dataset, after checking its manifest against ``cfg``.

    Tensor columns come back as fixed-shape tensors; drop ``caption`` and ``spec`` before
    ``iter_torch_batches``. ``text_mask`` is bool.
    """
    import ray.data

    manifest = read_manifest(path, cfg.data.s3_endpoint)
    validate_manifest(manifest, cfg, path)
    if not manifest["files"]:
        raise ValueError(f"cache {path} has no rows (skipped: {manifest['skipped']}); nothing to train on")
    fs, root = filesystem_for(path, cfg.data.s3_endpoint)
    files = [posixpath.join(root, name) for name in manifest["files"]]
    return ray.data.read_parquet(files, filesystem=fs, partitioning=None)


def _complete_manifest(
    fs: pafs.FileSystem, root: str, uri: str, key: str, endpoint: str, verify: str
) -> dict | None:
    """The manifest if the cache at ``root`` is complete and belongs to ``key``, else None.
    Complete: every listed file exists with the size (and, ``verify="sha256"``, the hash) the
    manifest records."""
    try:
        manifest = read_manifest(uri, endpoint)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if manifest.get("cache_key") != key or manifest.get("format_version") != FORMAT_VERSION:
        return None
    wrong = damaged_files(fs, root, manifest, verify)
    if wrong:
        log.warning("cache %s is damaged (%d file(s) missing, or of the wrong size or sha256, e.g. %s): "
                    "rebuilding it", uri, len(wrong), wrong[0])
        return None
    return manifest


# ---------------------------------------------------------------- building


def build_cache(cfg: Config, force: bool = False, num_cpus: int | None = None) -> tuple[str, dict]:
    """Build the cache for ``cfg`` (or reuse a complete one): returns (cache dir, manifest).

    Inputs are checked before any work. Ray is started only when there is work to do, and only if
    it is not running yet (``selfe.storage.ensure_ray``: the cluster when ``RAY_ADDRESS`` is set, else
    a local instance with ``num_cpus`` CPUs, default all).
    """
    data, endpoint = cfg.data, cfg.data.s3_endpoint
    key, out = cache_key(cfg), cache_dir(cfg)
    check_location(data.cache_root, endpoint, "data.cache_root", must_exist=False)
    fs, root = filesystem_for(out, endpoint)
    if not force and (manifest := _complete_manifest(fs, root, out, key, endpoint, data.verify_cache)):
        print(f"cache hit: {out} ({manifest['rows']} rows); nothing to do")
        return out, manifest

    source: tuple | None = None  # (filesystem, root, files) of a byte source
    if data.source == "shapes":
        source_format = "shapes"
    else:
        check_location(data.source, endpoint, "data.source")
        source_fs, source_root = filesystem_for(data.source, endpoint)
        source = (source_fs, source_root, list_files(source_fs, source_root))
        source_format = data.source_format if data.source_format != "auto" else detect_format(source[2])
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(root), recursive=True)  # an unwritable cache_root fails here, not later
    with build_lock(out, endpoint):
        if not force and (manifest := _complete_manifest(fs, root, out, key, endpoint, data.verify_cache)):
            print(f"cache hit: {out} ({manifest['rows']} rows), built meanwhile by another job; nothing to do")
            return out, manifest
        return _build(cfg, fs, root, out, key, source_format, source, num_cpus)


def _build(cfg: Config, fs: pafs.FileSystem, root: str, out: str, key: str, source_format: str,
           source: tuple | None, num_cpus: int | None) -> tuple[str, dict]:
    """Write a new build folder and commit it (holding the build lock)."""
    import ray

    data = cfg.data
    build_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    build_root = posixpath.join(root, BUILDS_DIR, build_id)
    ensure_ray(num_cpus)
    pool = cluster_encoder_pool(cfg, source_format)
    # The actors read their CPUs (torch threads) from the config: give them the planned pool's.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(data, encode_actors=pool.actors, encode_cpus=pool.cpus,
                                                            encode_gpus=pool.gpus))
    ledger = ray.remote(num_cpus=0)(Ledger).remote()
    try:
        if source_format == "shapes":
            ds = shapes_dataset(cfg)
        else:
            ds = byte_source_dataset(cfg, *source, source_format).map_batches(
                decode_batch,
                batch_size=64,
                num_cpus=data.decode_cpus,
                fn_kwargs={"resolution": data.resolution, "min_size": data.min_image_size, "ledger": ledger},
            )
        ds = ds.map_batches(
            EncodeBatch,
            fn_constructor_kwargs={"cfg": cfg, "ledger": ledger},
            batch_size=data.encode_batch_size,
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus,
        )
        start, job_start = time.perf_counter(), time.time()
        ds.write_parquet(
            posixpath.join(build_root, DATA_DIR),
            filesystem=fs,
            min_rows_per_file=_rows_per_file(cfg),
            ray_remote_args={"num_cpus": data.decode_cpus},
        )
        elapsed = time.perf_counter() - start
        counts, examples = ray.get(ledger.totals.remote())
        info = ray.get(ledger.encoder_info.remote())
        throughput = encode_throughput(ray.get(ledger.encode_timing.remote()), job_start, job_start + elapsed)
        throughput["pool"] = {"actors": pool.actors, "cpus": pool.cpus, "gpus": pool.gpus}
        if info is None:  # no row reached an encoder actor: load the encoders once for the metadata
            probe = ray.remote(_probe_encoders).options(num_cpus=pool.cpus, num_gpus=pool.gpus)
            info = ray.get(probe.remote(cfg))
    finally:
        ray.kill(ledger)

    previous = _read_manifest_or_none(fs, root)
    manifest = _finish(cfg, fs, root, build_root, key, source_format, counts, examples, info, elapsed, previous,
                       throughput)
    _collect_garbage(fs, root, manifest)
    _print_summary(out, manifest)
    return out, manifest


def _print_summary(out: str, manifest: dict) -> None:
    skipped = ", ".join(f"{r}={n}" for r, n in manifest["skipped"].items()) or "none"
    print(
        f"preprocess: wrote {manifest['rows']} rows to {out} in {manifest['elapsed_s']:.1f} s "
        f"({manifest['rows_per_s']:.0f} rows/s); skipped {sum(manifest['skipped'].values())} ({skipped}); "
        f"truncated captions: {manifest['truncated_captions']}"
    )
    tp = manifest.get("encode_throughput")
    if tp and "startup_s" in tp:  # absent when no row reached an encoder
        print(f"preprocess: {tp['pool']['actors']} encoder actor(s) of {tp['pool']['cpus']:g} CPUs; start-up "
              f"{tp['startup_s']:.1f} s, then {tp['steady_rows_per_s']:.0f} rows/s, "
              f"then {tp['finish_s']:.1f} s to finish; per encoder actor: "
              f"{', '.join(f'{r:.0f}' for r in tp['rows_per_s_per_actor'])} rows/s")


def _read_manifest_or_none(fs: pafs.FileSystem, root: str) -> dict | None:
    try:
        with fs.open_input_stream(posixpath.join(root, MANIFEST)) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _finish(
    cfg: Config, fs: pafs.FileSystem, root: str, build_root: str, key: str, source_format: str,
    counts: dict[str, int], examples: dict[str, list[str]], info: dict, elapsed: float, previous: dict | None,
    throughput: dict,
) -> dict:
    """Count the build's rows, check the accounting, write null_text then the manifest (last)."""
    from safetensors.torch import save

    written, rows = _count_rows(fs, build_root)
    files = sorted(written)
    skipped = {r: counts[r] for r in sorted(counts) if r not in ("seen", "written", "truncated_caption") and counts[r]}
    seen = cfg.data.num_samples if source_format == "shapes" else counts.get("seen", 0)
    for reason, n in skipped.items():
        log.warning("skipped %d rows: %s (e.g. %s)", n, reason, ", ".join(examples.get(reason, [])))
    if rows + sum(skipped.values()) != seen:
        raise RuntimeError(
            f"row accounting mismatch in build {build_root}: {seen} rows read, {rows} written, "
            f"{sum(skipped.values())} skipped; the cache was not committed. Rerun the build (a clean rerun "
            "writes a new build folder)"
        )

    _write_bytes(fs, posixpath.join(build_root, NULL_TEXT), save(info["null_text"]))
    now = time.time()
    superseded = [s for s in (previous or {}).get("superseded", []) if now - s["at"] < SUPERSEDED_KEEP_S]
    if previous and previous.get("build"):
        superseded.insert(0, {"build": previous["build"], "at": now})
    text = info["text_encoder"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "cache_key": key,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"uri": cfg.data.source, "format": source_format, **_source_params(cfg, source_format)},
        "resolution": cfg.data.resolution,
        "min_image_size": cfg.data.min_image_size,
        "rows": rows,
        "rows_read": seen,
        "build": posixpath.basename(build_root),
        "files": [posixpath.relpath(path, root) for path in files],
        "file_sizes": {posixpath.relpath(path, root): written[path] for path in files},
        "file_sha256": fingerprint(fs, root, [posixpath.relpath(path, root) for path in files]),
        "null_text": posixpath.relpath(posixpath.join(build_root, NULL_TEXT), root),
        "superseded": superseded,
        "columns": manifest_columns(info["latent_shape"], text["max_tokens"], text["width"], text["pooled_width"],
                                    cfg.objective.fake_score),
        "fake_prompt_prefix": cfg.objective.fake_prompt_prefix if cfg.objective.fake_score else None,
        "codec": {"kind": cfg.codec.kind, **info["codec"]},
        "text_encoder": text,
        "skipped": skipped,
        "skipped_examples": {r: examples.get(r, []) for r in skipped},
        "truncated_captions": counts.get("truncated_caption", 0),
        "truncated_examples": examples.get("truncated_caption", []),
        "elapsed_s": round(elapsed, 2),
        "rows_per_s": round(rows / max(elapsed, 1e-9), 1),
        "encode_throughput": throughput,
    }
    _write_bytes(fs, posixpath.join(root, MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest


def _count_rows(fs: pafs.FileSystem, build_root: str) -> tuple[dict[str, int], int]:
    """({parquet path: bytes}, total rows) of a build's data folder, from the files' footers."""
    import pyarrow.parquet as pq

    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(build_root, DATA_DIR), allow_not_found=True))
    written = {i.path: i.size for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")}
    rows = 0
    for path in written:
        with fs.open_input_file(path) as handle:
            rows += pq.ParquetFile(handle).metadata.num_rows
    return written, rows


def _source_params(cfg: Config, source_format: str) -> dict:
    if source_format == "shapes":
        return {"num_samples": cfg.data.num_samples, "seed": cfg.data.seed, "task_weights": cfg.data.task_weights}
    return {"image_column": cfg.data.image_column, "caption_column": cfg.data.caption_column}


def _rows_per_file(cfg: Config) -> int:
    """Rows per Parquet file for ~64 MB files, estimated from the model's input widths."""
    side = cfg.data.resolution // (cfg.codec.pixel_downsample if cfg.codec.kind == "pixels" else 8)
    row_bytes = 2 * (cfg.model.in_channels * side * side + cfg.text.max_tokens * cfg.model.text_width + cfg.model.pooled_width)
    return max(1, _TARGET_FILE_BYTES // (row_bytes + cfg.text.max_tokens))


def _collect_garbage(fs: pafs.FileSystem, root: str, manifest: dict) -> None:
    """Delete build folders nobody can be reading (holding the build lock): interrupted builds at
    once, superseded ones once ``SUPERSEDED_KEEP_S`` has passed (the manifest lists those younger)."""
    keep = {manifest["build"], *(s["build"] for s in manifest["superseded"])}
    builds = fs.get_file_info(pafs.FileSelector(posixpath.join(root, BUILDS_DIR), allow_not_found=True))
    for info in builds:
        if info.type == pafs.FileType.Directory and info.base_name not in keep:
            fs.delete_dir(info.path)


def _write_bytes(fs: pafs.FileSystem, path: str, payload: bytes) -> None:
    """Write atomically: a local file via rename of a temporary; an S3 object is visible only once complete."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as stream:
            stream.write(payload)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as stream:
            stream.write(payload)


def _probe_encoders(cfg: Config) -> dict:
    codec, text = build_encoders(cfg)
    return encoder_info(codec, text, cfg.data.resolution)
