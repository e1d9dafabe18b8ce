"""Elastic training's foundations without Ray: ``train.num_workers`` ranges and their validation, the
split of a global batch over workers and micro-batches, the same optimisation whatever the split, and
checkpoints written by N workers resumed by M (2 -> 1, 1 -> 2, 2 -> 3).

Every run below trains the same global batches (``_global_batch``, a function of the step) from the same
seed; a worker keeps its rows (``Share``). Against one process on the whole batch, only the order of
the gradient sums differs (FSDP's reduce-scatter, accumulation over micro-batches), so the losses agree
to fp32 reassociation noise: rtol 1e-5 over 4 steps. The multi-rank runs share two
``torch.multiprocessing.spawn`` calls (2 and 3 gloo ranks, ~10-30 s each on 2 cores: ``slow``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfe.config import ConfigError, load_config
from selfe.core.ema import make_ema
from selfe.core.objective import SelfEObjective
from selfe.core.types import Batch, TextCond
from selfe.train.checkpoint import load_checkpoint, save_checkpoint
from selfe.train.parallel import build_sharded_model
from selfe.train.step import Share, Trainee, build_optimizer, split_rows, train_step
from tests.ports import free_port

RES, TEXT, B, STEPS, HALF = 8, 8, 8, 4, 2
TINY = ["--model.width=32", "--model.head_dim=16", "--model.double_blocks=1", "--model.single_blocks=1",
        "--model.patch_size=2", f"--model.text_width={TEXT}", f"--model.pooled_width={TEXT}",
        "--model.abs_pos_embed=false", "--optim.lr=1e-3", "--optim.warmup_steps=0", f"--train.batch_size={B}",
        f"--data.resolution={RES}", "--train.compile=false", "--train.mixed_precision=fp32",
        "--objective.anneal_steps=0"]  # tau = 1 from step 0: the self-evaluation term is on


def _cfg(*extra):
    return load_config(overrides=[*TINY, *extra])


# --- configuration --------------------------------------------------------------------------------

def test_a_worker_range_is_read_from_the_cli_and_toml(tmp_path):
    cfg = _cfg("--train.num_workers=2-8")
    assert cfg.train.worker_range == (2, 8) and cfg.train.elastic and cfg.train.global_order
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nnum_workers = [1, 3]\nresize_interval_s = 5.0\n")
    cfg = load_config(str(toml), TINY)
    assert cfg.train.worker_range == (1, 3) and cfg.train.resize_interval_s == 5.0
    fixed = _cfg("--train.num_workers=2")
    assert fixed.train.worker_range == (2, 2) and not fixed.train.elastic and not fixed.train.global_order
    assert _cfg("--train.num_workers=2-2").train.elastic is False  # a range of one size is a fixed group


@pytest.mark.parametrize("extra, message", [
    (["--train.num_workers=3-2"], "1 <= low <= high"),
    (["--train.num_workers=0-2"], "1 <= low <= high"),
    (["--train.num_workers=2-16"], "smaller than train.num_workers' 16"),
    (["--train.num_workers=2-6", "--train.hsdp_replicas=2"], r"2-6 \(not 3, 5\) must be divisible by train.hsdp_replicas=2"),
    (["--train.num_workers=3"], "does not divide over 3 workers"),  # a fixed group reads sharded
    (["--train.num_workers=2-3", "--train.data_order=sharded"], "does not divide over 3 workers"),
    (["--train.data_order=random"], "data_order must be auto, global or sharded"),
    (["--train.micro_batch_size=-1"], "micro_batch_size"),
    (["--train.resize_interval_s=0"], "resize_interval_s must be > 0"),
])
def test_bad_worker_settings_are_refused_naming_the_fix(extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*extra)


def test_uneven_shares_are_fine_in_global_order():
    cfg = _cfg("--train.num_workers=3", "--train.data_order=global")
    assert [split_rows(B, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert cfg.train.global_order


def test_a_share_splits_rows_and_passes_evenly():
    for n, parts in ((16, 3), (8, 3), (5, 5), (7, 1), (2, 3)):
        spans = [split_rows(n, parts, i) for i in range(parts)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no gap, no overlap
        sizes = [hi - lo for lo, hi in spans]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert Share(16, 3, micro_batch_size=2).micro_batches == 3  # the largest share, 6 rows, in passes of 2
    assert Share(16, 2).micro_batches == 1 and Share(8, 3, rank=2).rows == (6, 8)


# --- the same optimisation whatever the split ----------------------------------------------------------

def _global_batch(step: int) -> tuple[Batch, TextCond]:
    g = torch.Generator().manual_seed(1000 + step)
    x0 = torch.randn(B, 3, RES, RES, generator=g).clamp(-1, 1)
    tokens = torch.randn(B, 4, TEXT, generator=g)
    cond = TextCond(tokens, torch.ones(B, 4, dtype=torch.bool), tokens[:, 0].clone())
    null = TextCond(torch.zeros(1, 4, TEXT), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, TEXT))
    return Batch(x0, cond), null


def _trainee(cfg) -> Trainee:
    device = torch.device("cpu")
    model = build_sharded_model(cfg.model, cfg.train, device)
    ema = make_ema(model, build_sharded_model(cfg.model, cfg.train, device, activation_checkpointing=False))
    return Trainee(model, ema, SelfEObjective(cfg.objective, (RES // 2) ** 2), build_optimizer(model, cfg.optim),
                   cfg.optim.grad_clip, None, torch.Generator().manual_seed(cfg.train.seed * 1000 + 17))


def _train(tr: Trainee, share: Share, steps: range, save: Path | None = None) -> list[float]:
    """Train ``steps`` on this worker's rows of the global batches; checkpoint into ``save`` after."""
    losses = []
    for step in steps:
        batch, null = _global_batch(step)
        lo, hi = share.rows
        mine = Batch(batch.x0[lo:hi], batch.cond[lo:hi])
        losses.append(train_step(tr, mine, null, step, 1e-3, 0.9, share)["loss"])
    if save is not None:
        save_checkpoint(save, tr.model, tr.ema, tr.optimizer, {"step": steps.stop, "epoch": 0,
                                                              "batch_in_epoch": steps.stop}, tr.generator)
    return losses


def _resume(tr: Trainee, path: Path) -> int:
    return load_checkpoint(path, tr.model, tr.ema, tr.optimizer, tr.generator)["step"]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    root_path, out = Path(root), {}
    try:
        if world == 2:
            out["whole"] = _train(_trainee(_cfg()), Share(B, 2, rank), range(STEPS))
            out["micro"] = _train(_trainee(_cfg()), Share(B, 2, rank, micro_batch_size=3), range(STEPS))
            out["first_half"] = _train(_trainee(_cfg()), Share(B, 2, rank), range(HALF), save=root_path / "by2")
            tr = _trainee(_cfg())
            out["from_1"] = [_resume(tr, root_path / "by1"), *_train(tr, Share(B, 2, rank), range(HALF, STEPS))]
        else:
            # 8 rows over 3 workers: 3, 3, 2; passes of 1 row: the last worker's third pass is a zero-weight one
            out["uneven"] = _train(_trainee(_cfg()), Share(B, 3, rank, micro_batch_size=1), range(STEPS))
            tr = _trainee(_cfg())
            out["from_2"] = [_resume(tr, root_path / "by2"), *_train(tr, Share(B, 3, rank), range(HALF, STEPS))]
        torch.save(out, root_path / f"w{world}r{rank}.pt")
        dist.barrier()  # rank 0 hosts the store: no rank may leave while another still uses it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process (the reference, and the 1-worker ends of the resumes), then 2 and 3 gloo ranks."""
    root = tmp_path_factory.mktemp("elastic")
    out = {"reference": _train(_trainee(_cfg()), Share(B), range(STEPS)),
           "one_micro": _train(_trainee(_cfg()), Share(B, micro_batch_size=3), range(STEPS))}
    _train(_trainee(_cfg()), Share(B), range(HALF), save=root / "by1")
    for world in (2, 3):
        mp.spawn(_worker, args=(world, free_port(), str(root)), nprocs=world, join=True)
        for rank in range(world):
            for name, losses in torch.load(root / f"w{world}r{rank}.pt").items():
                out.setdefault(f"{name}@{world}", []).append(losses)
    tr = _trainee(_cfg())
    out["from_2@1"] = [[_resume(tr, root / "by2"), *_train(tr, Share(B), range(HALF, STEPS))]]
    return out


def _close(a: list[float], b: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_every_split_trains_the_reference_losses(runs):
    reference = runs["reference"]
    assert len(set(reference)) == STEPS  # the steps changed the model
    _close(runs["one_micro"], reference)  # one worker, 3 passes of 3, 3, 2 rows
    for name in ("whole@2", "micro@2", "uneven@3"):
        for rank_losses in runs[name]:  # every worker reports the global batch's loss
            _close(rank_losses, reference)


@pytest.mark.slow
def test_checkpoints_resume_at_another_worker_count(runs):
    """Model, EMA, optimiser and the shared step generator come back at any size: the resumed steps
    are the uninterrupted run's."""
    reference = runs["reference"]
    for name in ("from_2@1", "from_1@2", "from_2@3"):  # 2 -> 1, 1 -> 2, 2 -> 3
        for resumed_at, *losses in runs[name]:
            assert resumed_at == HALF
            _close(losses, reference[HALF:])
    _close(runs["first_half@2"][0], reference[:HALF])
