"""FSDP2 wrapping as free functions: the model never knows it is sharded (torchtitan style).

Each double/single block is its own FSDP unit (one all-gather per block in forward and backward),
plus the root for the embedders and the final layer. Over W workers the mesh is either 1-D (plain
FSDP: every tensor split W ways) or, with ``train.hsdp_replicas = R``, 2-D of shape (R, W / R):
HSDP, parameters replicated across the R groups and split W / R ways within each.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch._dynamo
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.utils.checkpoint import checkpoint

from selfe.configtools import ConfigError
from selfe.core.model import MMDiT, ModelConfig
from selfe.train.step import mixed_precision_dtype

if TYPE_CHECKING:
    from selfe.config import TrainConfig


def _blocks(model: MMDiT) -> list[nn.Module]:
    return [*model.double_blocks, *model.single_blocks]


def apply_activation_checkpointing(model: MMDiT) -> None:
    """Recompute each block's activations in backward instead of storing them.

    The block's own ``forward`` is wrapped (not the module), so parameter names and checkpoints
    are unchanged, and FSDP's hooks stay outside the recomputed region.
    """
    for block in _blocks(model):
        inner = block.forward

        def forward(*args, _inner=inner):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False)
            return _inner(*args)

        block.forward = functools.wraps(inner)(forward)


BLOCK_GRAPHS_LIMIT = 32
"""Compiled graphs dynamo may keep per block class (its default, 8, is too few for a Self-E step)."""


def compile_blocks(model: MMDiT, backend: str = "inductor") -> None:
    """``torch.compile`` each double/single block in place (``nn.Module.compile``): parameter names are
    unchanged, and under FSDP2 each compiled block is still one FSDP unit (torchtitan's per-block compile).
    ``backend``: inductor in training; benchmarks may pick a cheaper one (aot_eager on CPU).

    Dynamo keeps one cache per code object, shared by every instance of a block class, and a Self-E step
    legitimately needs several entries per class: the online model with gradients, the online model
    without (the unconditional self-evaluation pass) and the EMA (parameters without requires_grad),
    each first at the one-row evaluation batch of the tau = 0 warm-up and then at a dynamic batch size,
    plus the sampler's batches. That is 9 for ``DoubleStreamBlock`` on the tiny recipe: one over dynamo's
    default limit of 8, after which the class ran eagerly for the rest of the run. The limit is raised
    (process-wide) so that every variant is compiled once during warm-up and steady training recompiles
    nothing (tests/test_compile.py counts it)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_GRAPHS_LIMIT)
    for block in _blocks(model):
        block.compile(backend=backend)


def device_mesh(device: torch.device, replicas: int) -> DeviceMesh | None:
    """The mesh to shard over: None (the default group, plain FSDP) for ``replicas`` = 1, else a 2-D
    (replicas, world / replicas) mesh named ("replicate", "shard"); ``fully_shard`` on a 2-D mesh is
    HSDP (all-gather and reduce-scatter within a row, gradient all-reduce down each column)."""
    if replicas == 1:
        return None
    world = dist.get_world_size()
    if world % replicas:
        raise ConfigError(f"world size {world} is not divisible by train.hsdp_replicas={replicas}: "
                          "set hsdp_replicas to a divisor of train.num_workers (e.g. the node count)")
    return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def shard(model: MMDiT, mp_dtype: torch.dtype | None = None, mesh: DeviceMesh | None = None) -> MMDiT:
    """``fully_shard`` per block and at the root over ``mesh`` (None: the default process group).

    mp_dtype: compute dtype of parameters (bf16 on GPU). The sharded parameters, and so the
    optimiser's master weights, stay fp32: FSDP casts the all-gathered copy to ``mp_dtype`` for
    forward/backward and reduces gradients in fp32 (``reduce_dtype``), so small updates are not lost
    to bf16's 8-bit mantissa.
    """
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def build_sharded_model(cfg: ModelConfig, train: TrainConfig, device: torch.device,
                        activation_checkpointing: bool | None = None) -> MMDiT:
    """Build on the meta device, shard, materialise on ``device``, then initialise.

    On CUDA no rank ever holds the full model: DTensor's random ops draw each shard from the same
    seeded stream as the full tensor, so every rank agrees on the weights whatever the mesh. On CPU
    DTensor has no distributed RNG, so ``init_from_full`` initialises there instead: the weights
    equal a single process's for the same seed, under any mesh.
    ``train`` gives fsdp, hsdp_replicas, mixed_precision, seed and activation_checkpointing
    (overridden by the argument when given: the EMA never runs backward).

    Blocks are compiled after sharding. torchtitan compiles first because it wraps each block in a
    ``torch.compile`` module and re-registers it, so FSDP's hooks land on the wrapper, outside the
    compiled code. ``compile_blocks`` compiles in place (``nn.Module.compile``: the module's own
    ``_call_impl``, which runs whatever hooks the module holds when it is called), so both orders
    compile the same thing: ``benchmarks/compile_order.py`` (2 gloo ranks, tiny preset) finds the
    same graphs, no graph break and identical losses in both, and step times within 1% (docs/benchmarks.md).
    """
    if activation_checkpointing is None:
        activation_checkpointing = train.activation_checkpointing
    with torch.device("meta"):
        model = MMDiT(cfg)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    # One worker has nothing to shard with: skip FSDP and its per-op DTensor overhead.
    if train.fsdp and dist.is_initialized() and dist.get_world_size() > 1:
        shard(model, mixed_precision_dtype(train.mixed_precision, device), device_mesh(device, train.hsdp_replicas))
    model.to_empty(device=device)
    torch.manual_seed(train.seed)
    if is_sharded(model) and device.type == "cpu":
        init_from_full(model, cfg)
    else:
        model.init_weights()
    if train.compile:
        compile_blocks(model, train.compile_backend)
    return model


@torch.no_grad()
def init_from_full(model: MMDiT, cfg: ModelConfig) -> None:
    """Initialise a sharded model from an unsharded one drawn from the current RNG state; each rank
    keeps its own pieces (``distribute_tensor(src_data_rank=None)`` slices locally, no traffic).

    Why: on a mesh without DTensor RNG support (CPU), ``init_weights`` on the shards would draw each
    rank's shard from that rank's own stream: under one seed every rank gets the same numbers, so a
    (2 x D) weight split in 2 holds two copies of one (1 x D) draw, and the weights depend on the
    mesh. Holding one full copy for a moment is affordable at CPU model sizes.
    """
    with torch.device("meta"):  # no RNG draws here: the stream is init_weights', as unsharded
        full = MMDiT(cfg)
    full.to_empty(device="cpu")
    full.init_weights()
    for p, q in zip(model.parameters(), full.parameters(), strict=True):
        if hasattr(p, "to_local"):
            p.to_local().copy_(distribute_tensor(q, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.copy_(q)


@contextlib.contextmanager
def one_rank_group(device: torch.device) -> Iterator[None]:
    """A process group of world size 1 (NCCL on CUDA, gloo on CPU) over a TCP store on 127.0.0.1, unless one
    is already initialised; destroyed on exit when made here."""
    if dist.is_initialized():
        yield
        return
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)  # port 0: the OS picks a free one
    device_id = None
    if device.type == "cuda":  # NCCL wants the device with its index ("cuda" alone is refused)
        device_id = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    dist.init_process_group("nccl" if device_id else "gloo", store=store, rank=0, world_size=1, device_id=device_id)
    try:
        yield
    finally:
        dist.destroy_process_group()


def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters())


def local_fraction(model: nn.Module) -> dict[str, float]:
    """Per parameter, the fraction of its elements stored on this rank (1.0 when unsharded)."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "to_local"):
            out[name] = p.to_local().numel() / max(p.numel(), 1)
        else:
            out[name] = 1.0
    return out
