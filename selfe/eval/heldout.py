"""The held-out slice of a user's own data that the real-data metrics (CLIP score, FID) score.

A row is held out when its caption hashes into the first ``fraction`` of [0, 1):

    u(caption) = int(sha256("selfe-heldout\\0" + caption)[:8]) / 2^64,   held out  <=>  u < fraction.

The decision is a pure function of the caption, so it needs no extra column and no cache rebuild,
is the same on every machine, run and resume, and keeps every copy of a duplicated caption on the
same side (a caption seen in training is never scored as "held out"). Training drops these rows
(``drop_heldout``, applied to the Ray Data stream in ``selfe.train.job``); evaluation reads them
back from the cache (``read_heldout``): captions, their stored text embeddings (the generator's
conditioning) and latents, which the codec decodes into FID's reference images.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from selfe.core.types import TextCond
from selfe.data.contract import CAPTION, LATENT, TENSOR_COLUMNS, text_cond

_SALT = b"selfe-heldout\0"


def heldout_unit(caption: str) -> float:
    """The caption's position in [0, 1): the first 8 bytes of sha256(salt + caption) / 2^64."""
    digest = hashlib.sha256(_SALT + caption.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def heldout_mask(captions: Iterable[str], fraction: float) -> np.ndarray:
    """(N,) bool: which captions are held out at ``fraction`` (0: none)."""
    return np.array([fraction > 0 and heldout_unit(c) < fraction for c in captions], dtype=bool)


def drop_heldout(batch: pa.Table, fraction: float) -> pa.Table:
    """A Ray Data ``map_batches`` function (``batch_format="pyarrow"``): the rows training may see."""
    keep = ~heldout_mask(batch.column(CAPTION).to_pylist(), fraction)
    return batch.filter(pa.array(keep))


@dataclass
class HeldoutSlice:
    """N held-out cache rows: ``captions`` (N), ``cond`` their text embeddings (tokens (N, L, D), mask
    (N, L), pooled (N, Dp), float32) and ``latents`` (N, C, h, w) float32, in cache order."""

    captions: list[str]
    cond: TextCond
    latents: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)

    def head(self, n: int) -> "HeldoutSlice":
        """The first ``n`` rows."""
        return HeldoutSlice(self.captions[:n], TextCond(*(t[:n] for t in (self.cond.tokens, self.cond.mask,
                                                                           self.cond.pooled))), self.latents[:n])


def _column_array(table: pa.Table, name: str, shape: list[int]) -> np.ndarray:
    """A fixed-shape tensor column (Ray's extension type or its large_list storage) -> (n, *shape)."""
    array = table.column(name).combine_chunks()
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), *shape)


def read_heldout(cache_path: str, fraction: float, limit: int, endpoint: str = "") -> HeldoutSlice:
    """The first ``limit`` held-out rows of the cache at ``cache_path`` (local or s3://), in the order of
    the manifest's files. Reads the caption column of each file, and the tensors of matching rows only.

    Raises:
        ValueError: the cache holds no held-out row at this fraction.
    """
    import pyarrow.parquet as pq

    from selfe.data.cache import read_manifest
    from selfe.storage import filesystem_for

    manifest = read_manifest(cache_path, endpoint)
    fs, root = filesystem_for(cache_path, endpoint)
    shapes = {c: manifest["columns"][c]["shape"] for c in TENSOR_COLUMNS}
    captions: list[str] = []
    parts: dict[str, list[np.ndarray]] = {c: [] for c in TENSOR_COLUMNS}
    for name in manifest["files"]:
        if len(captions) >= limit:
            break
        path = posixpath.join(root, name)
        file_captions = pq.read_table(path, columns=[CAPTION], filesystem=fs).column(CAPTION).to_pylist()
        rows = np.flatnonzero(heldout_mask(file_captions, fraction))[: limit - len(captions)]
        if not len(rows):
            continue
        table = pq.read_table(path, columns=list(TENSOR_COLUMNS), filesystem=fs).take(pa.array(rows))
        captions += [file_captions[i] for i in rows]
        for c in TENSOR_COLUMNS:
            parts[c].append(_column_array(table, c, shapes[c]))
    if not captions:
        raise ValueError(f"cache {cache_path} ({manifest['rows']} rows) has no held-out row at "
                         f"eval.heldout_fraction={fraction}: raise the fraction or use a larger dataset")
    tensors = {c: torch.from_numpy(np.concatenate(parts[c])) for c in TENSOR_COLUMNS}
    return HeldoutSlice(captions, text_cond(tensors), tensors[LATENT].float().numpy())
