"""Source folders written for the preprocessing tests: an image folder with one record of every
failure the job must skip and count (``EXPECTED_SKIPS``), and WebDataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.synthetic import image_bytes

LONG_CAPTION = " ".join(["a very long caption about a red square"] * 20)


def write_imagefolder(root: Path) -> None:
    """Good images in several modes plus one record of every failure; see EXPECTED_SKIPS."""
    root.mkdir(parents=True)
    files = {
        "good_rgb.png": image_bytes(),
        "good_grey.jpg": image_bytes(mode="L", fmt="JPEG", seed=1),
        "good_alpha.png": image_bytes(mode="RGBA", seed=2),
        "sub/good_palette.png": image_bytes(mode="P", seed=3),
        "long.png": image_bytes(seed=4),
        "sidecar.webp": image_bytes(fmt="WEBP", seed=5),
        "corrupt.jpg": b"\xff\xd8\xff not really a jpeg",
        "truncated.png": image_bytes(size=(64, 64), seed=6)[:300],
        "tiny.png": image_bytes(size=(8, 8)),
        "sixteen_bit.png": _sixteen_bit_png(),
        "empty_caption.png": image_bytes(seed=7),
        "no_caption.png": image_bytes(seed=8),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "sidecar.txt").write_text("a photo read from a sidecar file\n")
    records = [{"file_name": n, "text": f"caption of {n}"} for n in files if n not in ("sidecar.webp", "no_caption.png")]
    records = [r if r["file_name"] != "long.png" else {**r, "text": LONG_CAPTION} for r in records]
    records = [r if r["file_name"] != "empty_caption.png" else {**r, "text": "   "} for r in records]
    lines = [json.dumps(r) for r in records] + [json.dumps({"file_name": "ghost.png", "text": "gone"}), "{not json"]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _sixteen_bit_png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(out, format="PNG")
    return out.getvalue()


EXPECTED_SKIPS = {
    "corrupt_image": 2,
    "too_small": 1,
    "unsupported_mode": 1,
    "missing_caption": 2,
    "missing_image": 1,
    "bad_metadata": 1,
}


def write_shards(root: Path) -> None:
    root.mkdir(parents=True)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(root / "shard-000.tar", "w") as tar:
        add(tar, "a/000.jpg", image_bytes(fmt="JPEG"))
        add(tar, "a/000.txt", b"a jpeg with a txt caption")
        add(tar, "a/001.png", image_bytes(seed=1))
        add(tar, "a/001.json", json.dumps({"text": "a png with a json caption", "width": 48}).encode())
        add(tar, "a/002.webp", image_bytes(fmt="WEBP", seed=2))
        add(tar, "a/002.txt", b"a webp")
        add(tar, "a/003.jpg", b"garbage")
        add(tar, "a/003.txt", b"a corrupt image")
        add(tar, "a/004.txt", b"a caption without an image")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            add(tar, f"{i:03d}.png", image_bytes(size=(64, 64), seed=10 + i))
            add(tar, f"{i:03d}.txt", f"sample {i} of a shard cut short".encode())
    whole = buf.getvalue()
    third_png = whole.index(b"002.png")
    (root / "shard-001.tar").write_bytes(whole[: third_png + 512 + 100])  # ends inside the third image


def _img2dataset_rows(shard: int, count: int, failed: set[int]) -> list[dict]:
    """img2dataset's per-row metadata (downloader schema); ``failed`` row numbers have no image."""
    rows = []
    for i in range(count):
        key, ok = f"{shard:05d}{i:04d}", i not in failed
        rows.append({
            "url": f"http://images.example/{key}.jpg", "caption": f"img2dataset picture {key}", "key": key,
            "status": "success" if ok else "failed_to_download", "error_message": None if ok else "HTTP Error 404",
            "width": 32 if ok else None, "height": 32 if ok else None,
            "original_width": 48 if ok else None, "original_height": 40 if ok else None,
        })
    return rows


def _write_stats(root: Path, shard: int, rows: list[dict]) -> None:
    ok = sum(r["status"] == "success" for r in rows)
    (root / f"{shard:05d}_stats.json").write_text(json.dumps(
        {"count": len(rows), "successes": ok, "failed_to_download": len(rows) - ok, "failed_to_resize": 0,
         "status_dict": {"success": ok, "HTTP Error 404": len(rows) - ok}}, indent=4))


def write_img2dataset_parquet(root: Path) -> None:
    """`img2dataset --output_format parquet`: shard 0 has 3 images and 1 failed download, shard 1 one image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    for shard, count, failed in ((0, 4, {2}), (1, 1, set())):
        rows = _img2dataset_rows(shard, count, failed)
        images = [None if r["status"] != "success" else image_bytes(fmt="JPEG", seed=shard * 10 + i)
                  for i, r in enumerate(rows)]
        table = pa.Table.from_pylist(rows).append_column("jpg", pa.array(images, pa.binary()))
        pq.write_table(table, root / f"{shard:05d}.parquet")
        _write_stats(root, shard, rows)


def write_img2dataset_webdataset(root: Path) -> None:
    """`img2dataset --output_format webdataset`: shard 0 has 3 samples and 1 failed download (in its
    sidecar parquet only, as img2dataset writes it); shard 1 (3 samples) is cut inside its third image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    for shard, count, failed in ((0, 4, {1}), (1, 3, set())):
        rows = _img2dataset_rows(shard, count, failed)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, row in enumerate(r for r in rows if r["status"] == "success"):
                members = {"jpg": image_bytes(size=(64, 64), fmt="JPEG", seed=20 + shard * 10 + i),
                           "txt": row["caption"].encode(), "json": json.dumps(row, indent=4).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{row['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        whole = buf.getvalue()
        if shard == 1:
            whole = whole[: whole.index(f"{rows[2]['key']}.jpg".encode()) + 512 + 100]
        (root / f"{shard:05d}.tar").write_bytes(whole)
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
        _write_stats(root, shard, rows)
