"""Shard then compile, or compile then shard: step time and graphs of each order under FSDP2.

    python benchmarks/compile_order.py                       # 2 gloo ranks on CPU, tiny preset
    python benchmarks/compile_order.py --world 2 --device cuda --batch 64   # 2 GPUs, NCCL

``selfe.train.parallel.build_sharded_model`` shards the blocks (``fully_shard``) and then compiles them in
place (``nn.Module.compile``); torchtitan compiles first and shards the compiled blocks. Each order runs
in its own set of processes (dynamo's caches are per process), the orders alternate over ``--rounds``,
and every rank builds the same model from the same seed: the Self-E steps (tau = 1, the full cost) must
give the same losses in both orders. Prints per order and round: the warm-up seconds (compiling), the
median step time after it, dynamo's unique graphs and graph breaks, and the last loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ORDERS = ("shard_then_compile", "compile_then_shard")


def rank_main(rank: int, world: int, port: int, order: str, args: argparse.Namespace, queue) -> None:
    from torch._dynamo.utils import counters

    from selfe.bench.steptime import random_batch
    from selfe.config import load_config
    from selfe.core.ema import make_ema
    from selfe.core.model import MMDiT
    from selfe.core.objective import SelfEObjective
    from selfe.train.parallel import compile_blocks, init_from_full, shard
    from selfe.train.step import Trainee, build_optimizer, mixed_precision_dtype, train_step

    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    cfg = load_config(preset=args.preset)
    cfg.objective.anneal_steps = 0  # tau = 1 from the first step: every branch of the Self-E step runs
    mp_dtype = mixed_precision_dtype(cfg.train.mixed_precision, device)

    def build() -> MMDiT:
        with torch.device("meta"):
            model = MMDiT(cfg.model)
        if order == "compile_then_shard":
            compile_blocks(model)
        shard(model, mp_dtype)
        if order == "shard_then_compile":
            compile_blocks(model)
        model.to_empty(device=device)
        torch.manual_seed(0)
        if device.type == "cpu":
            init_from_full(model, cfg.model)
        else:
            model.init_weights()
        return model

    model = build()
    ema = make_ema(model, build())
    res = args.resolution
    tr = Trainee(model, ema, SelfEObjective(cfg.objective, cfg.model.num_tokens(res, res)),
                 build_optimizer(model, cfg.optim), 1.0, None, torch.Generator(device).manual_seed(rank))
    torch.manual_seed(1 + rank)
    data, null = random_batch(cfg, args.batch // world, res, args.text_tokens, device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stats = train_step(tr, data, null, 10_000, 1e-4, 0.999)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step.loss = stats["loss"]
        return time.perf_counter() - t0

    warm = sum(step() for _ in range(args.warmup))
    times = [step() for _ in range(args.steps)]
    if rank == 0:
        queue.put({"order": order, "warmup_s": round(warm, 2), "step_s": round(statistics.median(times), 4),
                   "unique_graphs": counters["stats"]["unique_graphs"],
                   "graph_breaks": sum(counters["graph_break"].values()), "last_loss": round(step.loss, 6)})
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="global batch, split over the ranks")
    ap.add_argument("--resolution", type=int, default=16, help="latent side")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for r in range(args.rounds):
        for order in (ORDERS if r % 2 == 0 else ORDERS[::-1]):
            queue = ctx.SimpleQueue()
            mp.start_processes(rank_main, args=(args.world, free_port(), order, args, queue), nprocs=args.world,
                               start_method="spawn")
            row = {"round": r, **queue.get()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    for order in ORDERS:
        mine = [x["step_s"] for x in rows if x["order"] == order]
        print(f"{order}: median step {statistics.median(mine):.4f} s over {len(mine)} rounds")
    return rows


if __name__ == "__main__":
    main()
