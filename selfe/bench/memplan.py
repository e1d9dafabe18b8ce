"""Memory plan of a training run: bytes per GPU of parameters, gradients, AdamW moments and the EMA,
under FSDP or HSDP at N workers, plus an activation estimate per token (pure torch, no Ray).

Model states (every tensor fp32; bf16 copies exist only transiently, one FSDP unit gathered at a time):

    params = 4 B x P / k,  grads = 4 B x P / k,  AdamW = 2 x 4 B x P / k (exp_avg, exp_avg_sq),
    EMA = 4 B x P / k

with k the shard degree: N under FSDP, the node size under HSDP (replicated across nodes). FSDP2
shards dim 0 and rounds up, so a (d0, ...) tensor costs ceil(d0 / k) rows per rank; the sums below
are exact for that layout, not P / k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selfe.core.model import MMDiT, ModelConfig

FP32, BF16 = 4, 2

# Activation elements saved per token per block for backward, in units of the width D, at MLP ratio
# r (hidden rD). Attention half: block input (LayerNorm) 1, modulated input to qkv 1, q/k/v 3, q/k
# after QK-norm 2, RoPE'd q/k and v as fed to attention 3, attention output 1, projection output (gate
# multiply) 1 = 12. MLP half: norm input 1, modulated input 1, fc1 output (GELU input) r, GELU output r,
# fc2 output (gate multiply) 1 = 3 + 2r. Fused attention saves O(1) per token and head (log-sum-exp),
# not the L x L scores. Single-stream blocks save about the same (their fused linear1 holds the
# q/k/v and MLP parts side by side).
ATTENTION_SAVED = 12


def saved_per_token_per_block(mlp_ratio: float) -> float:
    """Elements (in units of D) one token saves in one block without checkpointing: 12 + 3 + 2r."""
    return ATTENTION_SAVED + 3 + 2 * mlp_ratio


def activation_bytes_per_token(cfg: ModelConfig, checkpointing: bool, dtype_bytes: int = BF16) -> float:
    """Activation bytes per token (image or text) for backward, with B blocks = double + single:

    no checkpointing:  B x (15 + 2r) x D x dtype_bytes
    checkpointing:     B x D x dtype_bytes  (each block keeps only its input)
                       + (15 + 2r) x D x dtype_bytes  (one block recomputed at a time in backward)

    A double block holds a token in one of its two streams, so it costs the same per token as a
    single block. Per-step activations = this x tokens per GPU (batch/GPU x (image + text tokens)).
    """
    blocks = cfg.double_blocks + cfg.single_blocks
    per_block = saved_per_token_per_block(cfg.mlp_ratio) * cfg.width * dtype_bytes
    if checkpointing:
        return blocks * cfg.width * dtype_bytes + per_block
    return blocks * per_block


def param_shapes(cfg: ModelConfig) -> list[torch.Size]:
    """Shapes of every parameter, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return [p.shape for p in model.parameters()]


def sharded_numel(shapes: list[torch.Size], k: int) -> int:
    """Elements one rank stores when each tensor is split k ways on dim 0 (rounded up, FSDP2)."""
    return sum(math.ceil(s[0] / k) * math.prod(s[1:]) if len(s) else 1 for s in shapes)


@dataclass
class MemoryRow:
    """Bytes per GPU of one (preset, workers, mode) setting."""

    preset: str
    workers: int
    mode: str
    shard_degree: int
    params_total: int
    params: int
    grads: int
    adam: int
    ema: int

    @property
    def states(self) -> int:
        return self.params + self.grads + self.adam + self.ema


def plan(preset: str, cfg: ModelConfig, workers: int, mode: str, node_size: int = 8) -> MemoryRow:
    """Memory of the model states per GPU at ``workers`` GPUs; ``mode`` "fsdp" (k = workers) or
    "hsdp" (k = min(node_size, workers): sharded within a node, replicated across nodes)."""
    if mode not in ("fsdp", "hsdp"):
        raise ValueError(f"mode must be fsdp or hsdp, got {mode!r}")
    k = workers if mode == "fsdp" else min(node_size, workers)
    if workers % k:
        raise ValueError(f"{workers} workers do not split into nodes of {k}")
    shapes = param_shapes(cfg)
    local = sharded_numel(shapes, k)
    return MemoryRow(preset, workers, mode, k, sum(math.prod(s) for s in shapes),
                     FP32 * local, FP32 * local, 2 * FP32 * local, FP32 * local)


def markdown_table(rows: list[MemoryRow], cfgs: dict[str, ModelConfig]) -> str:
    """One Markdown row per setting; GiB per GPU, activations in MiB per 1k tokens (bf16)."""
    gib, mib = 2.0**30, 2.0**20
    lines = ["| preset | params | workers | mode | shard k | params GiB | grads GiB | AdamW GiB | EMA GiB "
             "| states GiB | act MiB/1k tok | act MiB/1k tok (ckpt) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = cfgs[r.preset]
        act = activation_bytes_per_token(cfg, False) * 1000 / mib
        act_ckpt = activation_bytes_per_token(cfg, True) * 1000 / mib
        lines.append(f"| {r.preset} | {r.params_total / 1e9:.2f}B | {r.workers} | {r.mode} | {r.shard_degree} "
                     f"| {r.params / gib:.3f} | {r.grads / gib:.3f} | {r.adam / gib:.3f} | {r.ema / gib:.3f} "
                     f"| {r.states / gib:.2f} | {act:.0f} | {act_ckpt:.0f} |")
    return "\n".join(lines)
