"""Per-batch work of the preprocessing job: decode + resize/crop, then encode with both frozen encoders.

Every function here takes and returns Ray Data numpy batches (``dict[str, np.ndarray]``) but runs
without Ray too, so the benchmark's single-process loop and the tests call the same code.

Row accounting. Bad rows are dropped here, never silently: each stage reports what it saw to a
`Ledger` (a Ray actor in the job) under a fingerprint of the batch's row ids. A retried batch reports
under the same fingerprint and overwrites its first report, so counts are exact even when Ray
re-executes tasks. The reasons a row is skipped for: ``missing_image`` (file absent, empty bytes, a
sample without an image member), ``missing_caption`` (none, or only whitespace), ``corrupt_image`` (PIL
cannot identify or fully decode it, truncated files included), ``unsupported_mode`` (pixel modes with
no faithful RGB conversion: 16/32-bit integer, float), ``too_small`` (shorter side below
``data.min_image_size``), ``bad_metadata`` (a metadata.jsonl line that is not a JSON object),
``corrupt_shard`` (a WebDataset tar that ends early or cannot be read, counted once per shard).
"""

from __future__ import annotations

import hashlib
import io
import math
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from selfe.data.contract import CAPTION, FAKE_COLUMNS, LATENT, SPEC, TEXT_COLUMNS, empty_text_columns

# Modes that convert to RGB without inventing a scaling: palette, grey, CMYK, YCbCr, with or without alpha.
_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
_EXAMPLES_PER_REASON = 5


def batch_fingerprint(ids: Sequence[str]) -> str:
    """Stable name of a batch from its row ids: a retried batch gets the same name."""
    digest = hashlib.blake2b(digest_size=12)
    for row_id in ids:
        digest.update(str(row_id).encode())
        digest.update(b"\0")
    return digest.hexdigest()


class Ledger:
    """Counts rows per stage and reason; reports are keyed by batch fingerprint (idempotent).

    Also holds what the encoder actors learnt at start-up (ids, widths, the null-caption embedding),
    so the driver writes the manifest without loading the models itself.
    """

    def __init__(self) -> None:
        self._reports: dict[str, tuple[dict[str, int], dict[str, list[str]]]] = {}
        self._timings: dict[str, dict[str, Any]] = {}
        self._encoder_info: dict[str, Any] | None = None

    def report(self, key: str, counts: dict[str, int], examples: dict[str, list[str]],
               timing: dict[str, Any] | None = None) -> None:
        self._reports[key] = (counts, examples)
        if timing is not None:
            self._timings[key] = timing

    def encode_timing(self) -> dict[str, dict[str, float]]:
        """Per encoder actor: rows encoded, seconds spent encoding (busy_s), when its models were loaded
        (ready) and when its last batch ended (last); wall-clock ``time.time`` stamps."""
        actors: dict[str, dict[str, float]] = {}
        for t in self._timings.values():
            a = actors.setdefault(t["actor"], {"rows": 0, "busy_s": 0.0, "ready": t["ready"], "last": t["end"]})
            a["rows"] += t["rows"]
            a["busy_s"] += t["end"] - t["start"]
            a["last"] = max(a["last"], t["end"])
        return actors

    def set_encoder_info(self, info: dict[str, Any]) -> None:
        if self._encoder_info is None:
            self._encoder_info = info

    def encoder_info(self) -> dict[str, Any] | None:
        return self._encoder_info

    def totals(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Summed counts over all batches, and up to 5 example row ids per reason."""
        counts: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        for batch_counts, batch_examples in self._reports.values():
            counts.update(batch_counts)
            for reason, ids in batch_examples.items():
                kept = examples.setdefault(reason, [])
                kept.extend(ids[: _EXAMPLES_PER_REASON - len(kept)])
        return dict(counts), examples


def _report(ledger: Any, stage: str, ids: Sequence[str], counts: dict[str, int], examples: dict,
            timing: dict[str, Any] | None = None) -> None:
    if ledger is None or not len(ids):
        return
    key = f"{stage}:{batch_fingerprint(ids)}"
    if hasattr(ledger, "report") and hasattr(ledger.report, "remote"):
        import ray

        ray.get(ledger.report.remote(key, counts, examples, timing))  # wait: the driver reads totals after the job
    else:
        ledger.report(key, counts, examples, timing)


def encode_throughput(timing: dict[str, dict[str, float]], job_start: float, job_end: float) -> dict[str, Any]:
    """Throughput of a build from ``Ledger.encode_timing``, in three phases of the job (``time.time``):
    startup_s until the first encoder actor holds its models; then steady_rows_per_s up to the last
    encoded batch; finish_s from there to the end (the last files written, the executor stopped).
    rows_per_s_per_actor: rows over that actor's encoding seconds (the scaling figure: what each added
    actor brings). Empty when no row was encoded."""
    if not timing:
        return {}
    ready, last = min(a["ready"] for a in timing.values()), max(a["last"] for a in timing.values())
    rows = sum(a["rows"] for a in timing.values())
    return {"actors": len(timing), "startup_s": round(ready - job_start, 2),
            "steady_rows_per_s": round(rows / max(last - ready, 1e-9), 1), "finish_s": round(job_end - last, 2),
            "rows_per_s_per_actor": [round(a["rows"] / max(a["busy_s"], 1e-9), 1) for a in timing.values()]}


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Scale the shorter side to ``size`` (bicubic, antialiased), centre-crop to a square: uint8 (size, size, 3)."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency over white (black, PIL's default, reads as content)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, resolution: int, min_size: int) -> tuple[np.ndarray | None, str]:
    """Encoded image bytes -> (uint8 (resolution, resolution, 3), "") or (None, skip reason)."""
    if not data:
        return None, "missing_image"
    try:
        image = Image.open(io.BytesIO(data))
        if image.mode not in _CONVERTIBLE_MODES:
            return None, "unsupported_mode"
        if min(image.size) < min_size:
            return None, "too_small"
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly; draft keeps both sides >= the request.
        image.draft("RGB", (resolution, resolution))
        image.load()  # raises on truncated data (PIL decodes lazily)
        return resize_center_crop(_to_rgb(image), resolution), ""
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, "corrupt_image"


def decode_batch(
    batch: dict[str, np.ndarray], resolution: int, min_size: int, ledger: Any = None
) -> dict[str, np.ndarray]:
    """Map ``{id, image: bytes, caption, spec, error}`` to ``{id, image: uint8 (B, R, R, 3), caption, spec}``.

    Rows that cannot be used are dropped and reported to ``ledger`` with their reason; ``error`` carries
    a reason a reader already found (e.g. a listed file that does not exist).
    """
    ids = [str(i) for i in batch["id"]]
    kept: list[int] = []
    images: list[np.ndarray] = []
    counts: Counter[str] = Counter(seen=len(ids))
    examples: dict[str, list[str]] = {}
    for row, row_id in enumerate(ids):
        reason = str(batch["error"][row] or "")
        caption = batch["caption"][row]
        if not reason and (not isinstance(caption, str) or not caption.strip()):
            reason = "missing_caption"
        if not reason:
            pixels, reason = decode_image(batch["image"][row], resolution, min_size)
        if reason:
            counts[reason] += 1
            bucket = examples.setdefault(reason, [])
            if len(bucket) < _EXAMPLES_PER_REASON:
                bucket.append(row_id)
            continue
        kept.append(row)
        images.append(pixels)
    _report(ledger, "decode", ids, dict(counts), examples)
    return {
        "id": np.array([ids[i] for i in kept], dtype=object),
        "image": np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8),
        "caption": np.array([batch["caption"][i].strip() for i in kept], dtype=object),
        "spec": np.array([batch["spec"][i] or "" for i in kept], dtype=object),
    }


class CaptionEmbeddings:
    """The text encoder behind a memo of caption -> (tokens f16, mask, pooled f16, truncated) rows.

    Captions repeat a lot in real data and in the shapes world (6000 scenes have ~1900 distinct
    captions), and the text encoder is the slow half of the job on CPUs: each distinct caption is
    encoded once per actor. The memo is LRU-bounded by ``max_bytes``.
    """

    def __init__(self, text: Any, max_bytes: int = 256 << 20) -> None:
        self.text = text
        self._memo: OrderedDict[str, tuple[np.ndarray, ...]] = OrderedDict()
        row_bytes = 2 * text.max_tokens * text.width + text.max_tokens + 2 * text.pooled_width + 1
        self._capacity = max(1, max_bytes // row_bytes)

    def __call__(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """(B,) captions -> text_tokens (B, L, D) f16, text_mask (B, L) bool, text_pooled (B, Dp) f16, truncated (B,)."""
        import torch

        new = [c for c in dict.fromkeys(captions) if c not in self._memo]
        for start in range(0, len(new), self.text.cfg.batch_size):
            chunk = new[start : start + self.text.cfg.batch_size]
            emb = self.text.encode(chunk)
            columns = (
                emb.tokens.to(torch.float16).cpu().numpy(),
                emb.mask.cpu().numpy().astype(bool),
                emb.pooled.to(torch.float16).cpu().numpy(),
                self.text.truncated(chunk).numpy(),
            )
            for row, caption in enumerate(chunk):
                self._memo[caption] = tuple(column[row] for column in columns)
        rows = []
        for caption in captions:
            self._memo.move_to_end(caption)
            rows.append(self._memo[caption])
        # Evict only after the lookups, so a batch with more distinct captions than the capacity still works.
        while len(self._memo) > self._capacity:
            self._memo.popitem(last=False)
        if not rows:
            text = self.text
            return {**empty_text_columns(text.max_tokens, text.width, text.pooled_width), "truncated": np.zeros(0, bool)}
        names = (*TEXT_COLUMNS, "truncated")
        return {name: np.stack([row[i] for row in rows]) for i, name in enumerate(names)}


def encode_arrays(images: np.ndarray, captions: Sequence[str], codec: Any, text: CaptionEmbeddings) -> dict[str, np.ndarray]:
    """uint8 images (B, R, R, 3) + captions -> the cache's tensor columns, plus ``truncated`` (B,) bool."""
    import torch

    from selfe.encoders import images_to_tensor

    if len(captions):
        with torch.inference_mode():
            latent = codec.encode(images_to_tensor(images)).to(torch.float16).cpu().numpy()
    else:
        side = images.shape[1] // codec.downsample
        latent = np.zeros((0, codec.channels, side, side), np.float16)
    return {LATENT: latent, **text(list(captions))}


def build_encoders(cfg: Any, device: str = "cpu") -> tuple[Any, Any]:
    """(image codec, text encoder) of ``cfg`` on ``device``: fp32 on CPU; bf16 networks on GPU.

    The pixel codec stays fp32 everywhere: it computes nothing, and bf16 would round pixel values.
    """
    import torch

    from selfe.encoders import TextEncoder, build_codec

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    codec_dtype = torch.float32 if cfg.codec.kind == "pixels" else dtype
    return build_codec(cfg.codec, device, codec_dtype), TextEncoder(cfg.text, device, dtype)


def encoder_info(codec: Any, text: Any, resolution: int) -> dict[str, Any]:
    """Identity, shapes and null-caption embedding of a loaded encoder pair (for the manifest)."""
    import torch

    null = text.encode([""])
    return {
        "codec": {
            "id": codec.id,
            "channels": codec.channels,
            "downsample": codec.downsample,
            "scale": float(codec.scale),
            "shift": float(codec.shift),
        },
        "text_encoder": {
            "id": text.id,
            "max_tokens": text.max_tokens,
            "width": text.width,
            "pooled_width": text.pooled_width,
        },
        "latent_shape": [codec.channels, resolution // codec.downsample, resolution // codec.downsample],
        "null_text": {
            "tokens": null.tokens.float().cpu().contiguous(),
            "mask": null.mask.to(torch.bool).cpu().contiguous(),
            "pooled": null.pooled.float().cpu().contiguous(),
        },
    }


class EncodeBatch:
    """Ray Data callable class: both frozen encoders in one actor, so a GPU never waits on another stage.

    Input batch ``{id, image: uint8 (B, R, R, 3), caption, spec}``; output the cache columns
    ``{latent, text_tokens, text_mask, text_pooled, caption, spec}``.
    """

    def __init__(self, cfg: Any, ledger: Any = None) -> None:
        import torch

        use_cuda = torch.cuda.is_available() and _assigned_gpus() > 0
        if not use_cuda:
            # One torch thread per reserved CPU, rounded up: 1.5 CPUs (on 2 cores, beside 0.5-CPU decode
            # tasks) runs 2 threads, which use the whole machine once the decoding is done.
            torch.set_num_threads(max(1, math.ceil(cfg.data.encode_cpus)))
        self.resolution = cfg.data.resolution
        # The fake-score term prompts the model with "fake image " + caption: its embeddings are cached too.
        self.fake_prefix = cfg.objective.fake_prompt_prefix if cfg.objective.fake_score else None
        self.codec, text = build_encoders(cfg, "cuda" if use_cuda else "cpu")
        self.text = CaptionEmbeddings(text)
        self.ledger = ledger
        self.actor, self.ready = uuid.uuid4().hex[:8], time.time()  # for the build's throughput figures
        if ledger is not None:
            import ray

            ray.get(ledger.set_encoder_info.remote(encoder_info(self.codec, text, self.resolution)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        ids = [str(i) for i in batch["id"]]
        captions = [str(c) for c in batch["caption"]]
        images = np.asarray(batch["image"], dtype=np.uint8).reshape(-1, self.resolution, self.resolution, 3)
        out = encode_arrays(images, captions, self.codec, self.text)
        truncated = out.pop("truncated")
        if self.fake_prefix is not None:
            fake = self.text([self.fake_prefix + c for c in captions])
            out.update({f: fake[t] for t, f in zip(TEXT_COLUMNS, FAKE_COLUMNS)})
        examples = {"truncated_caption": [ids[i] for i in np.flatnonzero(truncated)[:_EXAMPLES_PER_REASON]]}
        timing = {"actor": self.actor, "ready": self.ready, "start": start, "end": time.time(), "rows": len(ids)}
        _report(self.ledger, "encode", ids, {"written": len(ids), "truncated_caption": int(truncated.sum())}, examples,
                timing)
        out[CAPTION] = np.array(captions, dtype=object)
        out[SPEC] = np.array([str(s) for s in batch["spec"]], dtype=object)
        return out


def _assigned_gpus() -> int:
    """GPUs Ray assigned to this worker (0 outside Ray)."""
    import ray

    return len(ray.get_gpu_ids()) if ray.is_initialized() else 0
