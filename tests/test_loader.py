"""The per-epoch shuffle shared by the plain loop and the Ray Train worker."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from selfe.data.loader import batch_from_rows, epoch_batches, epoch_permutation, global_batches, shard_batches
from selfe.train.step import split_rows


def _rows(n: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(n, dtype=torch.float32)
    return {"latent": ids.view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(), "text_tokens": torch.zeros(n, 4, 8),
            "text_mask": torch.ones(n, 4, dtype=torch.bool), "text_pooled": torch.zeros(n, 8)}


def _ids(batch) -> list[int]:
    return batch.x0[:, 0, 0, 0].long().tolist()


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    a, b = epoch_permutation(100, seed=3, epoch=0), epoch_permutation(100, seed=3, epoch=0)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_permutation(100, seed=3, epoch=1))
    assert not torch.equal(a, epoch_permutation(100, seed=4, epoch=0))


def test_plain_batches_visit_every_row_once_per_epoch_and_resume_identically():
    rows = _rows(40)
    it = epoch_batches(rows, 8, seed=0)
    epochs = [[i for _ in range(5) for i in _ids(next(it))] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    assert epochs[0] != epochs[1]
    assert epochs[0] != list(range(40))
    # Resuming at epoch 1 after 2 batches continues with exactly the uninterrupted run's batches.
    resumed = epoch_batches(rows, 8, seed=0, epoch=1, skip=2)
    assert [i for _ in range(3) for i in _ids(next(resumed))] == epochs[1][16:]


def test_batch_from_rows_casts_to_fp32_and_bool():
    rows = _rows(4)
    rows["latent"] = rows["latent"].half()
    rows["text_mask"] = rows["text_mask"].to(torch.uint8)
    batch = batch_from_rows(rows)
    assert batch.x0.dtype == torch.float32 and batch.cond.mask.dtype == torch.bool and batch.fake_cond is None


@pytest.fixture(scope="module")
def ordered_dataset():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    yield ray.data.from_items([{"latent": np.full((3, 2, 2), i, np.float32)} for i in range(64)], override_num_blocks=4)
    ray.shutdown()


def _shard_epoch(ds, seed, epoch, buffer_rows=64):
    return [int(b["latent"][j, 0, 0, 0]) for b in shard_batches(ds.iterator(), 16, seed, epoch, 0, buffer_rows)
            for j in range(b["latent"].shape[0])]


def test_ray_shard_is_reshuffled_each_epoch_and_reproducible(ordered_dataset):
    e0, e0_again, e1 = (_shard_epoch(ordered_dataset, 0, e) for e in (0, 0, 1))
    assert sorted(e0) == sorted(e1) == list(range(64))
    assert e0 == e0_again, "the same (seed, epoch) must give the same order: resume depends on it"
    assert e0 != e1 and e0 != list(range(64))
    assert _shard_epoch(ordered_dataset, 0, 0, buffer_rows=0) == list(range(64))


def test_global_order_gives_every_worker_count_the_same_batches(ordered_dataset):
    """Each worker reads the whole stream and keeps its rows: for 1, 2 and 3 workers (16 rows: 8/8 and
    6/5/5) the workers' rows of batch k together are batch k of one worker, in order."""
    def epoch(world: int) -> list[list[int]]:
        shares = [list(global_batches(ordered_dataset.iterator(), 16, split_rows(16, world, r), 0, 1, 64))
                  for r in range(world)]
        return [[int(v) for part in parts for v in part["latent"][:, 0, 0, 0]] for parts in zip(*shares)]

    one = epoch(1)
    assert len(one) == 4 and sorted(v for b in one for v in b) == list(range(64))
    assert epoch(2) == one and epoch(3) == one
    assert one == [_shard_epoch(ordered_dataset, 0, 1)[i * 16:(i + 1) * 16] for i in range(4)]
