"""Training steps after a DCP checkpoint: does saving the optimizer state slow the steps that follow?

    python benchmarks/checkpoint_slowdown.py optim      # save only the optimizer state dict
    python benchmarks/checkpoint_slowdown.py model      # save only the model state dict
    python benchmarks/checkpoint_slowdown.py none       # no save (the control)
    python benchmarks/checkpoint_slowdown.py optim_torch  # the optimizer state dict through torch.save
    python benchmarks/checkpoint_slowdown.py optim_clone  # dcp.save of a copy of the optimizer state
    python benchmarks/checkpoint_slowdown.py optim_state  # dcp.save of its tensors only
    python benchmarks/checkpoint_slowdown.py optim_groups # dcp.save of its param groups only

After each window it lists the threads of this process that used CPU during it (from /proc), so a
thread left busy by the save shows up by name.

One process, one-rank FSDP2 on gloo (no Ray), the tiny preset on the default shapes cache (built by
``python pipelines/train.py`` or ``pipelines/preprocess.py`` first). Prints images/s over two windows
of 50 steps before and after the save. Run it alone on the machine.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.utils._pytree import tree_map_only

from selfe.config import load_config
from selfe.data.cache import cache_dir, read_null_text
from selfe.data.loader import epoch_batches, read_cache_tensors
from selfe.core.ema import ema_decay_at, make_ema
from selfe.core.objective import SelfEObjective
from selfe.train.checkpoint import save_checkpoint
from selfe.train.parallel import build_sharded_model, one_rank_group
from selfe.train.step import Trainee, build_optimizer, train_step


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) per thread of this process, keyed "tid:name" (Linux /proc)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[f"{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def busy_threads(before: dict[str, float], after: dict[str, float]) -> str:
    """Threads that used >= 0.05 CPU s between two censuses, busiest first."""
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return ", ".join(f"{k} {v:.2f}s" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.05)


def save(what: str, tmp: str, states: dict, checkpoint) -> None:
    """The save under test, written to ``tmp``."""
    if what == "optim_torch":
        torch.save(states["optim"](), os.path.join(tmp, "optim.pt"))
    elif what in ("optim_state", "optim_groups"):  # the tensors only / the non-tensor groups only
        part = "state" if what == "optim_state" else "param_groups"
        dcp.save({"optim": {part: states["optim"]()[part]}}, checkpoint_id=tmp)
    elif what in ("optim_steps", "optim_moments"):  # Adam's 0-d step tensors / its two moments
        keep = (lambda k: k == "step") if what == "optim_steps" else (lambda k: k != "step")
        state = {p: {k: v for k, v in st.items() if keep(k)} for p, st in states["optim"]()["state"].items()}
        dcp.save({"optim": {"state": state}}, checkpoint_id=tmp)
    elif what == "optim_split":  # the same tensors, steps and moments in two separate dicts
        st = states["optim"]()["state"]
        dcp.save({"steps": {p: {"step": v["step"]} for p, v in st.items()},
                  "moments": {p: {k: t for k, t in v.items() if k != "step"} for p, v in st.items()}},
                 checkpoint_id=tmp)
    elif what == "checkpoint":  # the real save_checkpoint (model, EMA, split optimizer state, RNG)
        checkpoint()
    elif what == "optim_clone":
        dcp.save({"optim": tree_map_only(torch.Tensor, torch.clone, states["optim"]())}, checkpoint_id=tmp)
    elif what != "none":
        dcp.save({what: states[what]()}, checkpoint_id=tmp)


def main(what: str) -> int:
    with one_rank_group(torch.device("cpu")):
        return run(what)


def run(what: str) -> int:
    torch.set_num_threads(2)
    cfg = load_config()
    t, b = cfg.train, cfg.train.batch_size
    model = build_sharded_model(cfg.model, t, torch.device("cpu"))
    ema = make_ema(model, build_sharded_model(cfg.model, t, torch.device("cpu")))
    cache = cache_dir(cfg)
    null_cond = read_null_text(cache)
    rows = read_cache_tensors(cache)
    objective = SelfEObjective(cfg.objective, cfg.model.num_tokens(*rows["latent"].shape[-2:]))
    tr = Trainee(model, ema, objective, build_optimizer(model, cfg.optim), 1.0, None, torch.Generator().manual_seed(0))
    batches = epoch_batches(rows, b, t.seed)
    step = 0

    def images_per_s(n: int) -> float:
        nonlocal step
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(tr, next(batches), null_cond, step, cfg.optim.lr, ema_decay_at(step, cfg.ema, b))
            step += 1
        return b * n / (time.perf_counter() - t0)

    def window() -> float:
        census = thread_cpu()
        rate = images_per_s(50)
        print(f"  {rate:.1f} img/s; threads busy: {busy_threads(census, thread_cpu())}", flush=True)
        return rate

    images_per_s(20)  # warm-up
    before = [window() for _ in range(2)]
    states = {"model": lambda: get_model_state_dict(model), "optim": lambda: get_optimizer_state_dict(model, tr.optimizer)}
    census = thread_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        save(what, tmp, states, lambda: save_checkpoint(tmp, model, ema, tr.optimizer, {"step": step}, tr.generator))
    print(f"  the save: threads busy: {busy_threads(census, thread_cpu())}", flush=True)
    after = [window() for _ in range(2)]
    print(f"save {what}: img/s before {before[0]:.1f}, {before[1]:.1f}; after {after[0]:.1f}, {after[1]:.1f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("none", "model", "optim", "optim_torch", "optim_clone", "optim_state", "optim_groups", "optim_steps",
                                                      "optim_moments", "optim_split", "checkpoint"):
        sys.exit("usage: python benchmarks/checkpoint_slowdown.py none|model|optim|optim_torch|optim_clone|optim_state|optim_groups|optim_steps|optim_moments|optim_split|checkpoint")
    sys.exit(main(sys.argv[1]))
