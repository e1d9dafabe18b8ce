"""FSDP2 wrapping as free functions: the model never knows it is sharded (torchtitan style).

Each double/single block is its own FSDP unit (one all-gather per block in forward and backward),
plus the root for the embedders and the final layer.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

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


def compile_blocks(model: MMDiT) -> None:
    """``torch.compile`` each double/single block in place (``nn.Module.compile``): parameter names are
    unchanged, and under FSDP2 each compiled block is still one FSDP unit (torchtitan's per-block compile)."""
    for block in _blocks(model):
        block.compile()


def shard(model: MMDiT, mp_dtype: torch.dtype | None = None) -> MMDiT:
    """``fully_shard`` per block and at the root over the default process group.

    mp_dtype: compute dtype of parameters (bf16 on GPU); gradients are reduced in fp32.
    """
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def build_sharded_model(cfg: ModelConfig, train: TrainConfig, device: torch.device,
                        activation_checkpointing: bool | None = None) -> MMDiT:
    """Build on the meta device, shard, materialise on ``device``, then initialise.

    No rank ever holds the full model. DTensor's random ops draw each shard from the same seeded
    stream as the full tensor, so every rank agrees on the weights whatever the world size.
    ``train`` gives fsdp, mixed_precision, seed and activation_checkpointing (overridden by the
    argument when given: the EMA never runs backward).
    """
    if activation_checkpointing is None:
        activation_checkpointing = train.activation_checkpointing
    with torch.device("meta"):
        model = MMDiT(cfg)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    # One worker has nothing to shard with: skip FSDP and its per-op DTensor overhead.
    if train.fsdp and dist.is_initialized() and dist.get_world_size() > 1:
        shard(model, mixed_precision_dtype(train.mixed_precision, device))
    model.to_empty(device=device)
    torch.manual_seed(train.seed)
    model.init_weights()
    if train.compile:
        compile_blocks(model)
    return model


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
