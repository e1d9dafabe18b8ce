"""The cache's rows as training batches, reshuffled every epoch with a seed from (run seed, epoch, rank).

The plain loop permutes rows held in memory (``epoch_batches``); the Ray Train worker shuffles its
streamed shard through a seeded buffer (``shard_batches``), or, in global order, reads the whole stream
and keeps its rows of each global batch (``global_batches``). Both orders depend only on ``epoch_seed``,
so a run resumed at (epoch, batch_in_epoch) continues with exactly the batches the uninterrupted
run would have trained on.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import torch

from selfe.core.types import Batch
from selfe.data.contract import batch_from_rows, training_columns


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends only on (run seed, epoch): (n,) int64."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def read_cache_tensors(cache_path: str, endpoint: str = "") -> dict[str, torch.Tensor]:
    """Every tensor column of a complete cache, in manifest order: {column: (n, ...) tensor}.

    For caches that fit in memory (the shapes world, benchmarks, probes).
    """
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers the tensor extension type the cache's columns use)

    from selfe.data.cache import read_manifest
    from selfe.storage import filesystem_for

    manifest = read_manifest(cache_path, endpoint)
    fs, root = filesystem_for(cache_path, endpoint)
    columns = training_columns(manifest)
    files = [posixpath.join(root, name) for name in manifest["files"]]
    table = pq.read_table(files, columns=columns, filesystem=fs)
    return {c: torch.from_numpy(table.column(c).combine_chunks().to_numpy_ndarray()) for c in columns}


def epoch_batches(rows: dict[str, torch.Tensor], batch_size: int, seed: int, epoch: int = 0,
                  skip: int = 0) -> Iterator[Batch]:
    """Endless batches over in-memory rows, reshuffled each epoch; the last partial batch of an epoch
    is dropped. Starts at ``epoch`` after ``skip`` batches (a resume)."""
    n = next(iter(rows.values())).shape[0]
    if n < batch_size:
        raise ValueError(f"the cache holds {n} rows, fewer than one batch of {batch_size}")
    while True:
        order = epoch_permutation(n, seed, epoch)
        for b in range(skip, n // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield batch_from_rows({k: v[idx] for k, v in rows.items()})
        epoch, skip = epoch + 1, 0


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The shuffle seed of one rank's pass over its shard in one epoch (fits numpy's 32-bit seeds)."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 12345) % (2**32)


def shard_batches(shard, batch_size: int, seed: int, epoch: int, rank: int, buffer_rows: int):
    """One epoch of a Ray Data shard as torch batches, shuffled through a ``buffer_rows`` buffer seeded
    from (run seed, epoch, rank). With the ingest's ``preserve_order`` the rows arrive in a fixed order,
    so the same (seed, epoch, rank) yields the same batches: a resume skips exactly what was trained."""
    shuffle = {"local_shuffle_buffer_size": buffer_rows, "local_shuffle_seed": epoch_seed(seed, epoch, rank)}
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=True, **(shuffle if buffer_rows else {}))


def global_batches(shard, batch_size: int, rows: tuple[int, int], seed: int, epoch: int, buffer_rows: int):
    """Rows [lo, hi) of each global batch of ``batch_size`` in one epoch of the whole stream ``shard``
    (every worker reads all of it), shuffled as rank 0 of ``shard_batches`` shuffles: batch k is the same
    samples for any worker count, and the workers' rows of it together are the whole batch."""
    lo, hi = rows
    for batch in shard_batches(shard, batch_size, seed, epoch, 0, buffer_rows):
        yield {k: v[lo:hi] for k, v in batch.items()}
