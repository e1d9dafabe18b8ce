"""Expected step time and MFU of a Self-E step at 8 and 64 GPUs, on paper, from the measured single-GPU
step: what one GPU cannot show (all-gather/reduce-scatter overlap, HSDP across nodes).

    python benchmarks/scaling_plan.py                          # the 0.5b preset, H200 figures below
    python benchmarks/scaling_plan.py --step-s 0.3337 --batch 32 --mfu 0.300 --inter-gbit 400

The model (docs/benchmarks.md, "Scaling plan"): weak scaling (each GPU keeps its micro-batch of
``--batch`` images, so its compute per step is the measured single-GPU step ``T_c``), FSDP2 as selfe
runs it (``fully_shard`` per block and at the root, parameters gathered in bf16, gradients
reduce-scattered in fp32, reshard after forward). Bytes each GPU moves per Self-E step, P parameters:

    all-gather   A = 2 bytes x P x g     g = 4 gathers: online forward, online backward (resharded after
                                         forward), the online no-grad pass, the EMA's no-grad pass
    reduce       R = 4 bytes x P         the fp32 gradients, once

A ring collective over k ranks moves (k - 1) / k of its buffer through each rank's slowest link:

    FSDP over N GPUs:   T_comm = (A + R) (N - 1) / N / bw          bw = NVLink inside one node, the
                                                                    network across nodes
    HSDP, R nodes x 8:  T_comm = (A + R) (8 - 1) / 8 / bw_nvlink    (gathers and reduce-scatters in the node)
                               + 2 (R_nodes - 1) / R_nodes x R / 8 / bw_net   (all-reduce of the shard's grads)

FSDP2 prefetches the next block's all-gather while the current block computes and reduce-scatters the
previous block's gradients during backward, so only what compute cannot cover stays exposed, plus the
first block's gather and the last block's reduce-scatter:

    T_step = max(T_c, T_comm) + (A + R) / U x (k - 1) / k / bw       U = FSDP units (blocks + root)

and MFU(N) = MFU(1) x T_c / T_step. Assumes communication and compute do not slow each other (SM
contention on NCCL kernels costs a few percent on H100s) and that the network gives ``--efficiency`` of
its line rate to NCCL.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GATHERS_SELF_E = 4
GATHERS_FLOW_MATCHING = 2  # forward and backward: no no-grad passes


@dataclass(frozen=True)
class Links:
    nvlink_gbyte_s: float = 360.0
    """All-gather bus bandwidth per GPU inside a node (H100/H200 SXM NVLink 4: 450 GB/s per direction,
    ~360 measured by nccl-tests at large messages)."""
    net_gbyte_s: float = 50.0
    """Per GPU across nodes: one 400 Gb/s NIC per GPU = 50 GB/s line rate."""
    efficiency: float = 0.85
    """Share of the network's line rate NCCL reaches at these message sizes."""
    node_gpus: int = 8


@dataclass(frozen=True)
class Plan:
    gpus: int
    mode: str
    comm_s: float
    exposed_s: float
    step_s: float
    mfu: float
    images_per_s: float


def plan_step(params: float, units: int, step_s: float, mfu_1: float, batch: int, gpus: int, mode: str,
              links: Links, gathers: int = GATHERS_SELF_E) -> Plan:
    """Expected step of ``mode`` ("fsdp" or "hsdp") over ``gpus`` GPUs (formulas in the module docstring)."""
    gather_b, reduce_b = 2.0 * params * gathers, 4.0 * params
    node = min(gpus, links.node_gpus)
    nodes = max(gpus // links.node_gpus, 1)
    nv, net = links.nvlink_gbyte_s * 1e9, links.net_gbyte_s * 1e9 * links.efficiency
    if gpus == 1:
        comm = edge = 0.0
    elif mode == "fsdp":
        bw = nv if nodes == 1 else net
        comm = (gather_b + reduce_b) * (gpus - 1) / gpus / bw
        edge = (gather_b + reduce_b) / units * (gpus - 1) / gpus / bw
    elif mode == "hsdp":
        inside = (gather_b + reduce_b) * (node - 1) / node / nv
        across = 2 * (nodes - 1) / nodes * reduce_b / node / net if nodes > 1 else 0.0
        comm = inside + across
        # The cross-node all-reduce of the last gradients cannot hide behind compute.
        edge = (gather_b + reduce_b) / units * (node - 1) / node / nv + across / units
    else:
        raise ValueError(f"mode must be fsdp or hsdp, got {mode!r}")
    step = max(step_s, comm) + edge
    return Plan(gpus, mode, comm, step - step_s, step, mfu_1 * step_s / step, gpus * batch / step)


def markdown(plans: list[Plan], batch: int) -> str:
    lines = [f"| GPUs | mode | comm per step (s) | exposed (s) | step (s) | MFU | images/s (batch {batch}/GPU) |",
             "|---|---|---|---|---|---|---|"]
    for p in plans:
        lines.append(f"| {p.gpus} | {p.mode} | {p.comm_s:.4f} | {p.exposed_s:.4f} | {p.step_s:.4f} | "
                     f"{p.mfu:.1%} | {p.images_per_s:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="0.5b")
    # The full-depth 0.5b Self-E step, compiled under one-rank FSDP2 on an H200 (docs/benchmarks.md).
    ap.add_argument("--step-s", type=float, default=0.3337)
    ap.add_argument("--mfu", type=float, default=0.300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--inter-gbit", type=float, default=400.0, help="network per GPU, Gb/s")
    ap.add_argument("--efficiency", type=float, default=0.85)
    ap.add_argument("--method", choices=["self_e", "flow_matching"], default="self_e")
    args = ap.parse_args(argv)

    from selfe.config import load_config
    from selfe.core.model import build_model

    import torch

    cfg = load_config(preset=args.preset).model
    with torch.device("meta"):
        model = build_model(cfg, "meta")
    params = float(sum(p.numel() for p in model.parameters()))
    units = cfg.double_blocks + cfg.single_blocks + 1
    links = Links(net_gbyte_s=args.inter_gbit / 8, efficiency=args.efficiency)
    gathers = GATHERS_SELF_E if args.method == "self_e" else GATHERS_FLOW_MATCHING
    plans = [plan_step(params, units, args.step_s, args.mfu, args.batch, n, mode, links, gathers)
             for n in args.gpus for mode in (("fsdp",) if n <= links.node_gpus else ("fsdp", "hsdp"))]
    table = markdown(plans, args.batch)
    print(f"{args.preset}: {params / 1e6:.1f}M parameters, {units} FSDP units, {args.method}, measured "
          f"T_c {args.step_s} s at batch {args.batch} and MFU {args.mfu:.1%} on one GPU; network "
          f"{args.inter_gbit:g} Gb/s per GPU at {args.efficiency:.0%}, NVLink {links.nvlink_gbyte_s:g} GB/s\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
