"""img2dataset output folders (parquet and webdataset output formats) as preprocessing sources.

The folders are written here in img2dataset's layout (tests/source_files.py): numbered shards, one
``<shard>_stats.json`` each, one failed download, one truncated tar. The slow tests run the real
preprocessing job on one Ray instance for the module (2 CPUs), locally and from moto S3.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from selfe.config import load_config
from selfe.configtools import ConfigError
from selfe.data.cache import build_cache, load_cache
from selfe.data.img2dataset import is_img2dataset, parquet_rows
from selfe.data.sources import detect_format, list_files
from selfe.eval.heldout import heldout_mask, read_heldout
from selfe.train.job import training_rows
from tests.source_files import write_img2dataset_parquet, write_img2dataset_webdataset, write_shards

PARQUET_CAPTIONS = sorted(f"img2dataset picture {k}" for k in ("000000000", "000000001", "000000003", "000010000"))
# Shard 0: keys 0, 2, 3 downloaded (1 failed); shard 1: keys 0 and 1 read before the cut in key 2's image.
WDS_CAPTIONS = sorted(f"img2dataset picture {k}" for k in ("000000000", "000000002", "000000003", "000010000", "000010001"))


def _files(root: Path) -> list[str]:
    return list_files(pafs.LocalFileSystem(), str(root))


def test_img2dataset_folders_are_detected_before_plain_parquet_and_tars(tmp_path: Path) -> None:
    write_img2dataset_parquet(tmp_path / "pq")
    write_img2dataset_webdataset(tmp_path / "wds")
    write_shards(tmp_path / "plain-tars")
    assert detect_format(_files(tmp_path / "pq")) == "img2dataset"
    assert detect_format(_files(tmp_path / "wds")) == "img2dataset"  # not "parquet" for its sidecars
    assert detect_format(_files(tmp_path / "plain-tars")) == "webdataset"
    # Numbered shards alone, or stats files alone, are not enough.
    assert not is_img2dataset(["/d/00000.parquet", "/d/00001.parquet"])
    assert not is_img2dataset(["/d/00000_stats.json", "/d/part-0.parquet"])
    assert is_img2dataset(["/d/sub/00003_stats.json", "/d/sub/00003.tar"])


def test_status_other_than_success_becomes_a_counted_download_failure() -> None:
    table = pa.table({
        "key": ["a", "b", "c"],
        "status": ["success", "failed_to_download", "success"],
        "path": ["/d/00000.parquet"] * 3,
        "jpg": pa.array([b"\xff\xd8img", None, None], pa.binary()),
        "caption": ["one", None, "three"],
    })
    rows = parquet_rows(table, "jpg", "caption", "/d").to_pydict()
    assert rows["id"] == ["00000.parquet:a", "00000.parquet:b", "00000.parquet:c"]
    assert rows["error"] == ["", "download_failed", "missing_image"]
    assert rows["image"] == [b"\xff\xd8img", b"", b""] and rows["caption"] == ["one", "", "three"]
    sidecar = parquet_rows(table.drop_columns(["jpg", "caption"]), "", "", "/d", failed_only=True).to_pydict()
    assert sidecar["id"] == ["00000.parquet:b"] and sidecar["error"] == ["download_failed"]


def test_source_format_accepts_img2dataset_only_by_its_name() -> None:
    assert load_config(overrides=["--data.source_format=img2dataset"]).data.source_format == "img2dataset"
    with pytest.raises(ConfigError, match="auto, imagefolder, webdataset, parquet or img2dataset"):
        load_config(overrides=["--data.source_format=img2data"])


# ---------------------------------------------------------------- the preprocessing job


@pytest.fixture(scope="module")
def ray_session(s3_server: str) -> Iterator[str]:
    """Ray on 2 CPUs; started after the moto fixture so workers inherit its fake AWS credentials."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield s3_server
    ray.shutdown()


def _cfg(cache_root: Path | str, source: Path | str, *overrides: str):
    return load_config(overrides=[f"--data.cache_root={cache_root}", f"--data.source={source}",
                                  "--data.encode_batch_size=16", *overrides])


@pytest.mark.slow
def test_parquet_output_format(ray_session: str, tmp_path: Path) -> None:
    write_img2dataset_parquet(tmp_path / "src")
    cfg = _cfg(tmp_path / "cache", tmp_path / "src")
    path, manifest = build_cache(cfg)
    assert manifest["source"]["format"] == "img2dataset"
    assert manifest["rows"] == 4 and manifest["rows_read"] == 5
    assert manifest["skipped"] == {"download_failed": 1}
    assert manifest["skipped_examples"]["download_failed"] == ["00000.parquet:000000002"]
    assert sorted(r["caption"] for r in load_cache(path, cfg).take_all()) == PARQUET_CAPTIONS
    # Real data is scored on held-out rows (eval suite clip_fid): training never sees them.
    fraction = 0.5
    held = {c for c, out in zip(PARQUET_CAPTIONS, heldout_mask(PARQUET_CAPTIONS, fraction)) if out}
    assert 0 < len(held) < len(PARQUET_CAPTIONS)  # this fraction splits these captions, so the check can fail
    real = _cfg(tmp_path / "cache", tmp_path / "src", "--eval.suite=clip_fid", f"--eval.heldout_fraction={fraction}")
    trained = training_rows(load_cache(path, real), real)
    assert trained.count() == len(PARQUET_CAPTIONS) - len(held) and "caption" not in trained.schema().names
    assert sorted(read_heldout(path, fraction, limit=10).captions) == sorted(held)  # and evaluation sees them


@pytest.mark.slow
def test_webdataset_output_format_counts_failures_and_the_truncated_shard(ray_session: str, tmp_path: Path) -> None:
    write_img2dataset_webdataset(tmp_path / "src")
    cfg = _cfg(tmp_path / "cache", tmp_path / "src")
    path, manifest = build_cache(cfg)
    assert manifest["source"]["format"] == "img2dataset"
    assert manifest["skipped"] == {"download_failed": 1, "corrupt_shard": 1}
    assert manifest["rows"] == 5 and manifest["rows_read"] == 7
    assert manifest["skipped_examples"]["download_failed"] == ["00000.parquet:000000001"]
    assert sorted(r["caption"] for r in load_cache(path, cfg).take_all()) == WDS_CAPTIONS


@pytest.mark.slow
def test_ray_read_webdataset_still_fails_on_a_truncated_shard(ray_session: str, tmp_path: Path) -> None:
    """Why tars are read by selfe's own reader (selfe/data/img2dataset.py): if this starts passing
    through, ray.data.read_webdataset can replace it."""
    import ray.data

    write_img2dataset_webdataset(tmp_path / "src")
    assert len(ray.data.read_webdataset(str(tmp_path / "src" / "00000.tar"), decoder=None).take_all()) == 3
    with pytest.raises(Exception, match="unexpected end of data"):
        ray.data.read_webdataset(str(tmp_path / "src" / "00001.tar"), decoder=None).take_all()


@pytest.mark.slow
def test_webdataset_output_format_from_s3(ray_session: str, tmp_path: Path) -> None:
    import boto3

    endpoint = ray_session
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="i2d")
    write_img2dataset_webdataset(tmp_path / "src")
    for file in (tmp_path / "src").iterdir():
        s3.put_object(Bucket="i2d", Key=f"laion-mini/{file.name}", Body=file.read_bytes())
    cfg = _cfg("s3://i2d/cache", "s3://i2d/laion-mini", f"--data.s3_endpoint={endpoint}")
    path, manifest = build_cache(cfg)
    assert path.startswith("s3://i2d/cache/") and manifest["source"]["format"] == "img2dataset"
    assert manifest["skipped"] == {"download_failed": 1, "corrupt_shard": 1} and manifest["rows"] == 5
    assert sorted(r["caption"] for r in load_cache(path, cfg).take_all()) == WDS_CAPTIONS
