"""The GPU code paths of training, exercised on CPU with gloo: bf16 mixed precision through FSDP2,
activation checkpointing, torch.compile of the blocks, HSDP meshes, and the memory plan.

The 2-rank scenarios share one ``torch.multiprocessing.spawn`` (one process group; 20-50 s on 2
shared cores, hence ``slow``) and are compared with a single-process reference that accumulates the same
two per-rank losses, so "same loss as single-process" is checked step by step, not only at init.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor

from selfe.config import ConfigError, load_config
from selfe.core.ema import make_ema, update_ema
from selfe.core.model import MODEL_PRESETS, ModelConfig
from selfe.core.objective import SelfEObjective
from selfe.core.types import Batch, TextCond
from selfe.bench.memplan import param_shapes, sharded_numel
from selfe.train.parallel import build_sharded_model, device_mesh, init_from_full, local_fraction, shard
from selfe.train.step import Trainee, build_optimizer, clip_grad_norm, train_step
from tests.ports import free_port

WORLD, STEPS, RES, TEXT = 2, 3, 8, 8
TINY = ["--model.width=32", "--model.head_dim=16", "--model.double_blocks=1", "--model.single_blocks=1",
        "--model.patch_size=2", f"--model.text_width={TEXT}", f"--model.pooled_width={TEXT}",
        "--model.abs_pos_embed=false", "--optim.lr=1e-3", "--optim.warmup_steps=0", "--train.batch_size=8",
        "--train.num_workers=2", f"--data.resolution={RES}", "--train.compile=false"]
# name -> train overrides; every scenario runs STEPS steps on the same per-rank batches and seeds.
SCENARIOS = {
    "fp32": [],
    "bf16": ["--train.mixed_precision=bf16"],
    "checkpointing": ["--train.activation_checkpointing=true"],
    "hsdp_2x1": ["--train.hsdp_replicas=2"],
}
LR, EMA_DECAY = 1e-3, 0.9


def _cfg(*extra):
    return load_config(overrides=[*TINY, "--train.mixed_precision=fp32", *extra])


def _batch(step: int, rank: int, per_rank: int = 4) -> tuple[Batch, TextCond]:
    """Rank ``rank``'s batch of step ``step`` (deterministic), and the null caption."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x0 = torch.randn(per_rank, 3, RES, RES, generator=g).clamp(-1, 1)
    tokens = torch.randn(per_rank, 4, TEXT, generator=g)
    cond = TextCond(tokens, torch.ones(per_rank, 4, dtype=torch.bool), tokens[:, 0].clone())
    null = TextCond(torch.zeros(1, 4, TEXT), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, TEXT))
    return Batch(x0, cond), null


def _generator(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(17 + rank)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _run(cfg, mesh=None) -> dict:
    """STEPS train_steps on this rank; loss per step, first-step local gradients, dtypes, shard fractions."""
    rank, device = dist.get_rank(), torch.device("cpu")
    if mesh is None:
        model = build_sharded_model(cfg.model, cfg.train, device)
        ema_empty = build_sharded_model(cfg.model, cfg.train, device, activation_checkpointing=False)
    else:  # a hand-made mesh (1 x 2): build as build_sharded_model does, with this mesh
        model, ema_empty = (shard(_meta_model(cfg.model), None, mesh) for _ in range(2))
        for m in (model, ema_empty):
            m.to_empty(device=device)
            torch.manual_seed(cfg.train.seed)
            init_from_full(m, cfg.model)
    _activate(model)
    tr = Trainee(model, make_ema(model, ema_empty), SelfEObjective(cfg.objective, (RES // 2) ** 2),
                 build_optimizer(model, cfg.optim), cfg.optim.grad_clip, None, _generator(rank))
    compute = []  # dtype a block's linear computes in: bf16 proves the policy is applied
    model.double_blocks[0].img_qkv.register_forward_hook(lambda m, i, o: compute.append(o.dtype))
    losses, grads = [], {}
    for step in range(STEPS):
        batch, null = _batch(step, rank)
        losses.append(train_step(tr, batch, null, step, LR, EMA_DECAY)["loss"])
        if step == 0:
            grads = {n: _local(p.grad).clone() for n, p in model.named_parameters()}
    state = [v for s in tr.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    return {"loss": losses, "grads": grads, "compute": sorted({str(d) for d in compute}),
            "params": sorted({str(p.dtype) for p in model.parameters()}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
            "state": sorted({str(v.dtype) for v in state}), "fraction": local_fraction(model)}


@torch.no_grad()
def _activate(model) -> None:
    """Add the same N(0, 0.1^2) noise to every parameter under any mesh. Why: adaLN-zero makes every
    block the identity and V = 0 at init, so the first losses would depend neither on the weights nor
    on the compute dtype."""
    for i, p in enumerate(model.parameters()):
        noise = 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        if hasattr(p, "to_local"):
            p.to_local().add_(distribute_tensor(noise, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.add_(noise)


def _meta_model(cfg: ModelConfig):
    from selfe.core.model import MMDiT

    with torch.device("meta"):
        return MMDiT(cfg)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {name: _run(_cfg(*extra)) for name, extra in SCENARIOS.items()}
        results["hsdp_1x2"] = _run(_cfg(), mesh=init_device_mesh(
            "cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")))
        try:
            device_mesh(torch.device("cpu"), 3)
        except ConfigError as e:
            results["mesh_error"] = str(e)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    print(f"2-rank gloo scenarios: {time.perf_counter() - t0:.1f} s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _reference_losses() -> list[list[float]]:
    """Single process, no FSDP: per step, each rank's loss on its batch with its generator, gradients
    accumulated as (loss_0 + loss_1) / 2 (what FSDP's averaging reduce-scatter computes), one AdamW step."""
    cfg = _cfg()
    model = build_sharded_model(cfg.model, cfg.train, torch.device("cpu"))
    _activate(model)
    ema = make_ema(model)
    objective, opt = SelfEObjective(cfg.objective, (RES // 2) ** 2), build_optimizer(model, cfg.optim)
    gens = [_generator(r) for r in range(WORLD)]
    for group in opt.param_groups:
        group["lr"] = LR
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        step_losses = []
        for rank in range(WORLD):
            batch, null = _batch(step, rank)
            out = objective(model, ema, batch.x0, batch.cond, null, step, None, gens[rank])
            (out.loss / WORLD).backward()
            step_losses.append(out.stats["loss"])
        losses.append(step_losses)
        clip_grad_norm(model, cfg.optim.grad_clip)
        opt.step()
        update_ema(ema, model, EMA_DECAY)
    return losses


def _losses(ranks, name) -> torch.Tensor:
    return torch.tensor([r[name]["loss"] for r in ranks]).T  # (STEPS, WORLD)


@pytest.mark.slow  # shares the 2-rank spawn: 20-50 s on 2 cores
def test_fsdp_and_hsdp_match_the_single_process_reference(ranks):
    reference = torch.tensor(_reference_losses())
    # fp32 throughout; only the order of the gradient sums differs (reduce-scatter vs accumulation).
    for name in ("fp32", "hsdp_2x1", "hsdp_1x2"):
        torch.testing.assert_close(_losses(ranks, name), reference, rtol=1e-5, atol=1e-6, msg=name)
    assert _losses(ranks, "fp32")[-1].ne(_losses(ranks, "fp32")[0]).all()  # the steps changed the model


@pytest.mark.slow  # shares the 2-rank spawn: 20-50 s on 2 cores
def test_sharded_initialisation_equals_the_unsharded_one(ranks):
    """On CPU meshes (no DTensor RNG) ``init_from_full`` makes the shards pieces of one draw, so the
    first losses (before any update) equal the unsharded model's; with ``init_weights`` on the shards
    each rank drew its half from its own stream and the weights differed by O(0.5)."""
    reference = torch.tensor(_reference_losses()[0])
    torch.testing.assert_close(_losses(ranks, "fp32")[0], reference, rtol=1e-6, atol=0)


@pytest.mark.slow  # shares the 2-rank spawn: 20-50 s on 2 cores
def test_hsdp_shard_fraction_is_what_the_mesh_implies(ranks):
    for r in ranks:
        # 2 x 1: replicated across the 2 groups, nothing split; 1 x 2 and plain FSDP: halves
        # (dim-0 shards, rounded up: biases of odd length would exceed 0.5, none here).
        assert set(r["hsdp_2x1"]["fraction"].values()) == {1.0}
        assert set(r["hsdp_1x2"]["fraction"].values()) == {0.5}
        assert set(r["fp32"]["fraction"].values()) == {0.5}
    assert "hsdp_replicas=3" in ranks[0]["mesh_error"] and "divisor" in ranks[0]["mesh_error"]
    # selfe.bench.memplan's rounding rule is FSDP2's: the run stored exactly this many elements per rank
    shapes = param_shapes(_cfg().model)
    stored = sum(f * s.numel() for f, s in zip(ranks[0]["fp32"]["fraction"].values(), shapes))
    assert stored == sharded_numel(shapes, WORLD)


def test_hsdp_replicas_is_validated():
    with pytest.raises(ConfigError, match="divisible by train.hsdp_replicas=3"):
        _cfg("--train.hsdp_replicas=3")
    with pytest.raises(ConfigError, match="hsdp_replicas"):
        _cfg("--train.hsdp_replicas=0")
    assert _cfg("--train.hsdp_replicas=2").train.hsdp_replicas == 2


@pytest.mark.slow  # shares the 2-rank spawn: 20-50 s on 2 cores
def test_bf16_mixed_precision_keeps_fp32_master_weights(ranks):
    for r in ranks:
        bf16 = r["bf16"]
        assert bf16["compute"] == ["torch.bfloat16"], "the blocks did not compute in bf16"
        assert r["fp32"]["compute"] == ["torch.float32"]
        # master weights, their (fp32-reduced) gradients and both Adam moments stay fp32
        assert bf16["params"] == bf16["grad_dtypes"] == bf16["state"] == ["torch.float32"]
    fp32, bf16 = _losses(ranks, "fp32"), _losses(ranks, "bf16")
    assert torch.isfinite(bf16).all()
    rel = ((bf16 - fp32).abs() / fp32.abs()).max().item()
    print(f"bf16 vs fp32 loss: max relative difference {rel:.2e} over {STEPS} steps x {WORLD} ranks")
    # bf16 keeps 8 significant bits: each rounding is off by <= 2^-9 relative (2^-8 ~ 0.4% per op
    # between neighbours). A forward through 2 blocks is ~20 rounded ops in series, whose errors add
    # like a random walk (~sqrt(20) * 2^-8 ~ 2%), and the mean-squared loss averages many such
    # outputs, shrinking it; 5% allows the walk and 2 updates taken with bf16 gradients, while a
    # policy that did nothing (difference 0) or a broken cast (difference O(1)) fails.
    assert 0 < rel < 5e-2, rel


@pytest.mark.slow  # shares the 2-rank spawn: 20-50 s on 2 cores
def test_activation_checkpointing_gives_the_same_loss_and_gradients(ranks):
    # Recomputing a block repeats the same fp32 ops on the same inputs: equal up to round-off.
    torch.testing.assert_close(_losses(ranks, "checkpointing"), _losses(ranks, "fp32"), rtol=1e-6, atol=1e-7)
    for r in ranks:
        worst = 0.0
        for name, g in r["fp32"]["grads"].items():
            other = r["checkpointing"]["grads"][name]
            torch.testing.assert_close(other, g, rtol=1e-5, atol=1e-7, msg=name)
            worst = max(worst, (other - g).abs().max().item())
        assert any(g.abs().sum() > 0 for g in r["fp32"]["grads"].values())
    print(f"activation checkpointing: max |grad difference| {worst:.2e}")


def _inductor_unavailable() -> str | None:
    """Why torch.compile cannot run here (no C compiler, or inductor fails on a one-line function)."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler (cc/gcc) on PATH: inductor cannot build its CPU kernels"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - any failure means the path cannot be tested here
        return f"inductor does not work here: {type(e).__name__}: {e}"
    return None


def _single_process_losses(cfg) -> tuple[list[float], list[float]]:
    """STEPS steps of rank 0's batches in one process; (loss per step, seconds per step)."""
    model = build_sharded_model(cfg.model, cfg.train, torch.device("cpu"))
    _activate(model)
    # as the worker builds it: an unsharded EMA from build_sharded_model (compiled like the model)
    ema = make_ema(model, build_sharded_model(cfg.model, cfg.train, torch.device("cpu"), activation_checkpointing=False))
    tr = Trainee(model, ema, SelfEObjective(cfg.objective, (RES // 2) ** 2), build_optimizer(model, cfg.optim),
                 cfg.optim.grad_clip, None, _generator(0))
    losses, seconds = [], []
    for step in range(STEPS):
        t0 = time.perf_counter()
        losses.append(train_step(tr, *_batch(step, 0), step, LR, EMA_DECAY)["loss"])
        seconds.append(time.perf_counter() - t0)
    return losses, seconds


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss():
    reason = _inductor_unavailable()
    if reason:
        pytest.skip(reason)
    eager, eager_s = _single_process_losses(_cfg())
    compiled, compiled_s = _single_process_losses(_cfg("--train.compile=true"))
    # The first step pays the compile (graphs for the grad and no-grad calls of each block kind).
    print(f"torch.compile of the blocks: first step {compiled_s[0]:.1f} s (eager {eager_s[0]:.2f} s), "
          f"later steps {sum(compiled_s[1:]) / (STEPS - 1):.3f} s vs eager {sum(eager_s[1:]) / (STEPS - 1):.3f} s")
    # Inductor fuses and reorders fp32 ops: equal to eager up to accumulated fp32 round-off.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-6)


def test_memory_plan_matches_the_parameter_sizes():
    from selfe.core.model import build_model
    from selfe.bench.memplan import plan

    cfg = load_config(preset="0.5b").model
    total = sum(p.numel() for p in build_model(cfg, "meta").parameters())
    one = plan("0.5b", cfg, 1, "fsdp")
    assert one.params_total == total and one.params == 4 * total and one.adam == 8 * total
    assert one.states == (4 + 4 + 8 + 4) * total
    for workers in (8, 32, 64):
        fsdp, hsdp = plan("0.5b", cfg, workers, "fsdp"), plan("0.5b", cfg, workers, "hsdp", node_size=8)
        # dim-0 shards rounded up: at least 1/N of the total, padding below one row per tensor
        assert 4 * total <= workers * fsdp.params < 4 * total * 1.01
        assert hsdp.params == plan("0.5b", cfg, 8, "fsdp").params  # sharded 8 ways within a node


def test_activation_estimate_is_close_to_the_tensors_autograd_saves():
    """Bytes autograd keeps for backward (saved-tensor hooks; parameters excluded) against the
    per-token formula at fp32, for a 1+1-block model over 4 x (256 image + 16 text) tokens."""
    from selfe.core.model import build_model
    from selfe.bench.memplan import activation_bytes_per_token

    cfg = ModelConfig(width=64, head_dim=16, double_blocks=1, single_blocks=1, text_width=8, pooled_width=8)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():  # leave adaLN-zero so that every branch is live
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    b, n_txt = 4, 16
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(b, 3, 32, 32), torch.rand(b), torch.zeros(b), torch.randn(b, n_txt, 8),
              torch.ones(b, n_txt, dtype=torch.bool), torch.randn(b, 8))
    estimate = activation_bytes_per_token(cfg, checkpointing=False, dtype_bytes=4) * b * (256 + n_txt)
    measured = sum(saved.values())
    print(f"activations: measured {measured / 1e6:.2f} MB, estimated {estimate / 1e6:.2f} MB")
    # the estimate leaves out the embedders' and final layer's few D per token: within 25%
    assert 0.9 * estimate <= measured <= 1.25 * estimate, (measured, estimate)
