"""Source readers and image decoding without a Ray job: what they accept, skip and refuse."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from selfe.config import load_config
from selfe.data.cache import build_cache
from selfe.data.transforms import decode_image
from tests.synthetic import image_bytes


def test_decode_composites_alpha_on_white_and_crops_centre() -> None:
    transparent = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    out = io.BytesIO()
    transparent.save(out, format="PNG")
    pixels, reason = decode_image(out.getvalue(), resolution=16, min_size=8)
    assert reason == "" and pixels.shape == (16, 16, 3) and (pixels == 255).all()
    assert decode_image(b"", 16, 8) == (None, "missing_image")


def test_hugging_face_image_structs_are_read() -> None:
    from selfe.data.sources import _parquet_rows

    png = image_bytes()
    images = pa.array([{"bytes": png, "path": "a.png"}, {"bytes": None, "path": "b.png"}])
    table = pa.table({"image": images, "text": ["a", "b"], "path": ["/d/x.parquet"] * 2})
    rows = _parquet_rows(table, "image", "text", "/d").to_pydict()
    assert rows["image"] == [png, b""] and rows["error"] == ["", "missing_image"]
    assert rows["id"][0].startswith("x.parquet:") and rows["spec"] == ["", ""]


def test_missing_source_fails_before_any_work(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"--data.cache_root={tmp_path / 'cache'}", f"--data.source={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="data.source .*nowhere"):
        build_cache(cfg)
    assert not (tmp_path / "cache").exists()
