"""The Ray Data preprocessing job and its versioned cache (pipelines/preprocess.py, selfe/data/cache.py).

One Ray instance for the module (2 CPUs, as on the CI box). Every fixture is generated here: small
images, WebDataset tars, Parquet files, and deliberately broken records of every kind.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selfe.config import Config, load_config
from selfe.configtools import ConfigError
from selfe.data.cache import (
    CacheMismatchError,
    build_cache,
    cache_dir,
    cache_key,
    load_cache,
    read_manifest,
    read_null_text,
    validate_manifest,
)
from selfe.data.shapes import ShapesConfig, generate_one, spec_to_json
from tests.source_files import EXPECTED_SKIPS, LONG_CAPTION, write_imagefolder, write_shards
from tests.synthetic import image_bytes

@pytest.fixture(scope="module")
def ray_session(s3_server: str) -> Iterator[str]:
    """Ray on 2 CPUs; started after the moto fixture so workers inherit its fake AWS credentials."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield s3_server
    ray.shutdown()


def make_cfg(cache_root: Path | str, *overrides: str) -> Config:
    return load_config(overrides=[f"--data.cache_root={cache_root}", "--data.encode_batch_size=16", *overrides])


def rows_of(path: str, cfg: Config) -> list[dict]:
    """The cache's rows, read with pyarrow from the files its manifest lists (quicker than a Ray job)."""
    import ray.data  # noqa: F401  (registers the tensor extension types)

    from selfe.storage import filesystem_for

    fs, root = filesystem_for(path, cfg.data.s3_endpoint)
    files = [f"{root}/{name}" for name in read_manifest(path, cfg.data.s3_endpoint)["files"]]
    table = pq.read_table(files, filesystem=fs)
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    arrays = {name: (col.to_pylist() if pa.types.is_string(col.type) else col.to_numpy()) for name, col in columns.items()}
    return [{name: values[i] for name, values in arrays.items()} for i in range(table.num_rows)]


# ---------------------------------------------------------------- shapes world


@pytest.fixture(scope="module")
def shapes_cache(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, str, dict]:
    cfg = make_cfg(tmp_path_factory.mktemp("shapes-cache"), "--data.num_samples=40")
    path, manifest = build_cache(cfg)
    return cfg, path, manifest


@pytest.mark.slow
def test_shapes_cache_rows_and_manifest(shapes_cache: tuple[Config, str, dict]) -> None:
    cfg, path, manifest = shapes_cache
    assert path == cache_dir(cfg) and path.endswith(cache_key(cfg))
    assert manifest["rows"] == manifest["rows_read"] == 40 and manifest["skipped"] == {}
    assert manifest["columns"]["latent"] == {"shape": [3, 16, 16], "dtype": "float16"}  # 2x pooled pixels
    tokens = cfg.text.max_tokens
    assert manifest["columns"]["text_tokens"]["shape"] == [tokens, 384]
    assert manifest["text_encoder"]["id"].startswith("minilm:") and manifest["codec"]["kind"] == "pixels"

    ds = load_cache(path, cfg)
    batch = next(iter(ds.drop_columns(["caption", "spec"]).iter_torch_batches(batch_size=8, drop_last=True)))
    assert batch["latent"].dtype == torch.float16 and batch["latent"].shape == (8, 3, 16, 16)
    assert batch["text_tokens"].dtype == torch.float16 and batch["text_tokens"].shape == (8, tokens, 384)
    assert batch["text_mask"].dtype == torch.bool and batch["text_mask"].shape == (8, tokens)
    assert batch["text_pooled"].shape == (8, 384)
    assert batch["text_mask"].any(dim=1).all()

    rows = rows_of(path, cfg)
    by_spec = {row["spec"]: row for row in rows}
    image, caption, spec = generate_one(7, 0, ShapesConfig(resolution=32))
    row = by_spec[spec_to_json(spec)]
    assert row["caption"] == caption
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    expected = torch.nn.functional.avg_pool2d(pixels[None], cfg.codec.pixel_downsample)[0]  # the 2x pooled pixels
    assert torch.allclose(torch.as_tensor(row["latent"]).float(), expected, atol=1e-2)

    null = read_null_text(path)
    assert null.tokens.shape == (1, tokens, 384) and null.tokens.dtype == torch.float32
    assert null.mask.dtype == torch.bool and null.pooled.shape == (1, 384)

    # The pool sized from the 2-CPU cluster: 40 rows render as one block, so one actor with the spare 1.5 CPUs.
    tp = manifest["encode_throughput"]
    assert cfg.data.encode_actors is None and tp["pool"] == {"actors": 1, "cpus": 1.5, "gpus": 0.0}
    # Throughput with the start-up apart: every row passed through the one encoder actor after it loaded.
    assert tp["actors"] == 1 and 0 < tp["startup_s"] < manifest["elapsed_s"]
    assert 0 <= tp["finish_s"] < manifest["elapsed_s"] - tp["startup_s"]
    assert tp["steady_rows_per_s"] > 0 and len(tp["rows_per_s_per_actor"]) == 1
    assert tp["rows_per_s_per_actor"][0] >= tp["steady_rows_per_s"]  # encoding seconds <= the steady span


def test_encode_throughput_separates_start_up_and_counts_each_actor() -> None:
    from selfe.data.transforms import Ledger, encode_throughput

    ledger = Ledger()
    # Two actors ready at t=10 and t=12 (job started at t=4); a batch retried under the same key counts once.
    batches = [("a", 10, 10, 12, 64), ("a", 10, 12, 13, 64), ("b", 12, 12, 16, 32), ("b", 12, 12, 16, 32)]
    for i, (actor, ready, start, end, rows) in enumerate(batches):
        ledger.report(f"encode:{min(i, 2)}", {"written": rows}, {},
                      {"actor": actor, "ready": ready, "start": start, "end": end, "rows": rows})
    tp = encode_throughput(ledger.encode_timing(), job_start=4.0, job_end=19.0)
    # 160 rows from the first ready actor (t=10) to the last batch (t=16); a: 128 rows in 3 busy s, b: 32 in 4.
    assert tp == {"actors": 2, "startup_s": 6.0, "steady_rows_per_s": round(160 / 6, 1), "finish_s": 3.0,
                  "rows_per_s_per_actor": [round(128 / 3, 1), 8.0]}
    assert encode_throughput({}, 0.0, 1.0) == {}


@pytest.mark.slow
def test_rerun_is_a_cache_hit(shapes_cache: tuple[Config, str, dict], capsys: pytest.CaptureFixture) -> None:
    cfg, path, manifest = shapes_cache
    again_path, again = build_cache(cfg)
    assert again_path == path and again == manifest
    assert f"cache hit: {path} (40 rows)" in capsys.readouterr().out


@pytest.mark.slow
def test_key_depends_on_inputs_not_on_execution(shapes_cache: tuple[Config, str, dict]) -> None:
    cfg, _, _ = shapes_cache
    root = cfg.data.cache_root
    assert cache_key(make_cfg(root, "--data.num_samples=40", "--data.encode_batch_size=7")) == cache_key(cfg)
    for change in ("--data.seed=1", "--data.resolution=64", "--text.max_tokens=24", "--data.num_samples=41"):
        assert cache_key(make_cfg(root, "--data.num_samples=40", change)) != cache_key(cfg), change


@pytest.mark.slow
def test_interrupted_run_is_redone_cleanly(shapes_cache: tuple[Config, str, dict], tmp_path: Path) -> None:
    cfg, path, manifest = shapes_cache
    # An interrupted build of the same inputs: a build folder with data (one file twice), no manifest.
    root = tmp_path / "cache"
    cfg2 = make_cfg(root, "--data.num_samples=40", "--data.encode_batch_size=7", "--data.decode_cpus=1")
    broken = Path(cache_dir(cfg2))
    shutil.copytree(path, broken)
    (broken / "manifest.json").unlink()
    (old_build,) = (broken / "builds").iterdir()
    first = sorted((old_build / "data").glob("*.parquet"))[0]
    shutil.copy(first, first.with_name("partial-duplicate.parquet"))
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        read_manifest(str(broken))

    path2, manifest2 = build_cache(cfg2)
    assert path2 == str(broken) and manifest2["rows"] == 40
    assert not old_build.exists()  # the interrupted build is removed, not appended to
    before = sorted((r["spec"], r["caption"], np.asarray(r["latent"]).tobytes()) for r in rows_of(path, cfg))
    after = sorted((r["spec"], r["caption"], np.asarray(r["latent"]).tobytes()) for r in rows_of(path2, cfg2))
    assert after == before  # same rows, none twice, whatever the batch size and fusion


@pytest.mark.slow
def test_concurrent_builds_commit_one_build_and_force_keeps_readers_whole(
    ray_session: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import threading

    cfg = make_cfg(tmp_path, "--data.num_samples=24")
    results: list = []
    builders = [threading.Thread(target=lambda: results.append(build_cache(cfg))) for _ in range(2)]
    for b in builders:
        b.start()
    for b in builders:
        b.join(300)
    (path, first), (_, second) = results
    assert first["build"] == second["build"] and first["rows"] == second["rows"] == 24
    assert "built meanwhile by another job" in capsys.readouterr().out
    assert len(list((Path(path) / "builds").iterdir())) == 1 and len(rows_of(path, cfg)) == 24

    # A forced rebuild commits a new build; a job still reading the old one finds all its files.
    old_files = [Path(path) / f for f in first["files"]]
    _, forced = build_cache(cfg, force=True)
    assert forced["build"] != first["build"] and forced["superseded"][0]["build"] == first["build"]
    assert all(f.exists() for f in old_files) and len(rows_of(path, cfg)) == 24

    # A truncated file is not a cache hit: the next build replaces the damaged build.
    victim = Path(path) / forced["files"][0]
    victim.write_bytes(victim.read_bytes()[:100])
    _, rebuilt = build_cache(cfg)
    assert rebuilt["build"] not in (first["build"], forced["build"]) and len(rows_of(path, cfg)) == 24

    # Same-size damage: a size check is fooled, the default sha256 check is not.
    victim = Path(path) / rebuilt["files"][0]
    assert rebuilt["file_sha256"][rebuilt["files"][0]] == hashlib.sha256(victim.read_bytes()).hexdigest()
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    _, sized = build_cache(make_cfg(tmp_path, "--data.num_samples=24", "--data.verify_cache=size"))
    assert sized["build"] == rebuilt["build"]
    _, hashed = build_cache(cfg)
    assert hashed["build"] != rebuilt["build"] and len(rows_of(path, cfg)) == 24


@pytest.mark.slow
def test_manifest_mismatch_is_explained(shapes_cache: tuple[Config, str, dict], tmp_path: Path) -> None:
    _, path, _ = shapes_cache
    wrong = make_cfg(
        tmp_path, "--data.resolution=64", "--text.max_tokens=24", "--model.in_channels=4", "--model.text_width=512"
    )
    with pytest.raises(CacheMismatchError) as err:
        load_cache(path, wrong)
    message = str(err.value)
    for expected in ("data.resolution=64", "text.max_tokens=24", "model.in_channels=4", "model.text_width=512"):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="not a complete cache"):
        load_cache(str(tmp_path), wrong)


# ---------------------------------------------------------------- image folder, WebDataset, Parquet


@pytest.mark.slow
def test_imagefolder_counts_every_bad_record(ray_session: str, tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "src")
    cfg = make_cfg(tmp_path / "cache", f"--data.source={tmp_path / 'src'}")
    path, manifest = build_cache(cfg)
    assert manifest["source"]["format"] == "imagefolder"
    assert manifest["skipped"] == EXPECTED_SKIPS
    assert manifest["rows"] == 6 and manifest["rows_read"] == 6 + sum(EXPECTED_SKIPS.values())
    assert manifest["truncated_captions"] == 1 and manifest["truncated_examples"] == ["long.png"]
    assert "corrupt.jpg" in manifest["skipped_examples"]["corrupt_image"]
    rows = rows_of(path, cfg)
    captions = {r["caption"] for r in rows}
    assert "a photo read from a sidecar file" in captions and LONG_CAPTION in captions
    assert {r["spec"] for r in rows} == {""}
    assert all(np.asarray(r["text_mask"]).all() for r in rows if r["caption"] == LONG_CAPTION)


@pytest.mark.slow
def test_fake_score_adds_fake_prompt_columns(ray_session: str, tmp_path: Path) -> None:
    """objective.fake_score caches c_fake = "fake image " + caption beside the caption (own cache key),
    and the cache without them is refused for such a run."""
    from selfe.encoders.text import TextEncoder

    plain = make_cfg(tmp_path, "--data.num_samples=12")
    fake_cfg = make_cfg(tmp_path, "--data.num_samples=12", "--objective.fake_score=true")
    assert cache_key(plain) != cache_key(fake_cfg)
    plain_path, _ = build_cache(plain)
    with pytest.raises(CacheMismatchError, match="objective.fake_score"):
        validate_manifest(read_manifest(plain_path), fake_cfg, plain_path)
    path, manifest = build_cache(fake_cfg)
    assert manifest["fake_prompt_prefix"] == "fake image "
    assert manifest["columns"]["fake_tokens"] == manifest["columns"]["text_tokens"]
    row = rows_of(path, fake_cfg)[0]
    expect = TextEncoder(fake_cfg.text).encode(["fake image " + row["caption"], row["caption"]])
    fake_tokens = torch.as_tensor(row["fake_tokens"]).float()
    assert torch.allclose(fake_tokens, expect.tokens[0], atol=1e-2)
    assert not torch.allclose(fake_tokens, torch.as_tensor(row["text_tokens"]).float(), atol=1e-2)
    assert (torch.as_tensor(row["fake_mask"]) == expect.mask[0]).all()


@pytest.mark.slow
def test_webdataset_shards(ray_session: str, tmp_path: Path) -> None:
    write_shards(tmp_path / "shards")
    cfg = make_cfg(tmp_path / "cache", f"--data.source={tmp_path / 'shards'}")
    path, manifest = build_cache(cfg)
    assert manifest["source"]["format"] == "webdataset"
    assert manifest["skipped"] == {"corrupt_image": 1, "missing_image": 1, "corrupt_shard": 1}
    assert manifest["rows"] == 5  # 3 from the good shard, 2 read before the cut
    captions = {r["caption"] for r in rows_of(path, cfg)}
    assert {"a jpeg with a txt caption", "a png with a json caption", "sample 1 of a shard cut short"} <= captions


@pytest.mark.slow
def test_parquet_source_with_custom_columns(ray_session: str, tmp_path: Path) -> None:
    (tmp_path / "pq").mkdir()
    table = pa.table({
        "jpeg": pa.array([image_bytes(seed=i) for i in range(3)] + [b"\x00\x01", None, image_bytes()], pa.binary()),
        "prompt": ["one", "two", "three", "four", "five", None],
        "extra": list(range(6)),
    })
    pq.write_table(table, tmp_path / "pq" / "part-0.parquet")
    base = [f"--data.source={tmp_path / 'pq'}", "--data.caption_column=prompt"]
    with pytest.raises(ConfigError, match=r"no column\(s\) \['image'\].*'jpeg'"):
        build_cache(make_cfg(tmp_path / "cache", *base))
    cfg = make_cfg(tmp_path / "cache", *base, "--data.image_column=jpeg")
    path, manifest = build_cache(cfg)
    assert manifest["source"]["format"] == "parquet"
    assert manifest["skipped"] == {"corrupt_image": 1, "missing_image": 1, "missing_caption": 1}
    assert sorted(r["caption"] for r in rows_of(path, cfg)) == ["one", "three", "two"]


@pytest.mark.slow
def test_actor_pool_that_starves_the_readers_is_refused(ray_session: str, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "cache", "--data.num_samples=8", "--data.encode_actors=2", "--data.encode_cpus=1")
    with pytest.raises(ConfigError, match="would wait forever. Lower data.encode_actors"):
        build_cache(cfg)


# ---------------------------------------------------------------- S3 (moto on 127.0.0.1)


@pytest.mark.slow
def test_s3_round_trip(ray_session: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import boto3

    endpoint = ray_session
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="prep")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        s3.put_object(Bucket="prep", Key=f"images/{i}.png", Body=image_bytes(seed=i))
        s3.put_object(Bucket="prep", Key=f"images/{i}.txt", Body=f"s3 image {i}".encode())
    s3.put_object(Bucket="prep", Key="images/bad.png", Body=b"broken")
    s3.put_object(Bucket="prep", Key="images/bad.txt", Body=b"a broken image")

    over = ["--data.source=s3://prep/images", f"--data.s3_endpoint={endpoint}"]
    cfg = make_cfg("s3://prep/cache", *over)
    path, manifest = build_cache(cfg)
    assert path.startswith("s3://prep/cache/") and manifest["rows"] == 4
    assert manifest["skipped"] == {"corrupt_image": 1}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="prep", Prefix="cache/")["Contents"]]
    assert any(k.endswith("/manifest.json") for k in keys) and any(k.endswith(".parquet") for k in keys)
    assert sorted(r["caption"] for r in load_cache(path, cfg).take_all()) == [f"s3 image {i}" for i in range(4)]
    assert read_null_text(path, endpoint).tokens.shape == (1, cfg.text.max_tokens, 384)
    capsys.readouterr()
    build_cache(cfg)
    assert "cache hit" in capsys.readouterr().out

    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        build_cache(make_cfg("s3://no-such-bucket/cache", *over))
    with pytest.raises(FileNotFoundError, match="s3://prep/missing"):
        build_cache(make_cfg("s3://prep/cache", "--data.source=s3://prep/missing", f"--data.s3_endpoint={endpoint}"))


def test_s3_without_usable_credentials_names_the_problem(
    s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        (tmp_path / name).write_text("")
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = make_cfg("s3://prep/cache", "--data.source=s3://prep/images", f"--data.s3_endpoint={s3_server}")
    with pytest.raises(PermissionError, match="no AWS credentials found to read data.cache_root s3://prep/cache"):
        build_cache(cfg)
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(PermissionError, match="cannot load AWS credentials .*nobody"):
        build_cache(cfg)


class _Tag:
    """Stands in for the encoder actor (same resources, so Ray Data may fuse the render into it); tags
    each row with the actor's process."""

    def __call__(self, batch: dict) -> dict:
        import os

        return {"id": batch["id"], "pid": np.full(len(batch["id"]), os.getpid())}


def test_shapes_render_is_fused_into_cpu_encoder_actors_only(ray_session: str, tmp_path: Path) -> None:
    """A planned CPU pool renders inside the actors (no render task competing for the cores), and both
    actors get blocks; with no planned pool (or a GPU one) the render stays in its own tasks."""
    import ray.data

    from selfe.data.sources import shapes_blocks, shapes_dataset

    n = 256 * 12
    assert shapes_blocks(n) == 12
    for encode_cpus, fused in ((0.75, True), (None, False)):
        cfg = make_cfg(tmp_path, f"--data.num_samples={n}", f"--data.encode_cpus={encode_cpus}", "--data.encode_gpus=0")
        ds = shapes_dataset(cfg).map_batches(_Tag, batch_size=64, compute=ray.data.ActorPoolStrategy(size=2),
                                             num_cpus=0.75, num_gpus=0.0).materialize()
        rows = ds.to_pandas()
        assert sorted(rows["id"]) == sorted(f"shapes:{i}" for i in range(n))
        assert ("MapBatches(_render_shapes)->MapBatches(_Tag)" in ds.stats()) is fused, ds.stats()
        if fused:  # one row per range once bundled every range into a single actor's input
            assert rows["pid"].nunique() == 2
