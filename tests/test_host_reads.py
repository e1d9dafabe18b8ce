"""A training step keeps the host off the device's back: on a GPU every read of a device value (``float``,
``.item()``, a boolean index, ``nonzero``) waits for all queued work, and one between the forward and the
backward leaves the GPU idle while the host queues the backward. The Self-E step reads once before its
forwards (which rows have s < t: the self-evaluation passes' batch) and once at its end (its statistics,
``tolist``); the optimiser's step counters live on the CPU and do not count."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from selfe.config import load_config
from selfe.core.ema import make_ema
from selfe.core.model import build_model
from selfe.core.objective import SelfEObjective
from selfe.core.types import Batch, TextCond
from selfe.train.step import Share, Trainee, build_optimizer, train_step

READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.masked_select"}


class DeviceReads(TorchDispatchMode):
    """Records the ops that make the host wait for a tensor's value, outside torch.optim."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in READS:
            frames = traceback.extract_stack()
            if not any("/torch/optim/" in f.filename for f in frames):
                where = next(f"{f.filename.rsplit('/selfe/', 1)[-1]}:{f.lineno}" for f in reversed(frames)
                             if "/selfe/" in f.filename)
                self.reads.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,micro", [("self_e", 0), ("self_e", 4), ("flow_matching", 0)])
def test_a_step_reads_the_device_only_for_its_eval_rows(method, micro):
    cfg = load_config(overrides=["--objective.anneal_steps=2", f"--objective.method={method}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    length, width = cfg.text.max_tokens, cfg.model.text_width
    null = TextCond(torch.zeros(1, length, width), torch.ones(1, length, dtype=torch.bool), torch.zeros(1, width))
    tr = Trainee(model, make_ema(model), SelfEObjective(cfg.objective, 64), build_optimizer(model, cfg.optim), 1.0,
                 None, g)
    for step in range(4):  # tau = 0 at step 0 (no row with s < t), then rising
        batch = Batch(torch.randn(16, 3, 16, 16, generator=g),
                      TextCond(torch.randn(16, length, width, generator=g), torch.arange(length).expand(16, length) < 9,
                               torch.randn(16, width, generator=g)))
        with DeviceReads() as mode:
            stats = train_step(tr, batch, null, step, 1e-3, 0.99, Share(16, micro_batch_size=micro))
        expected = 1 if method == "self_e" else 0  # nonzero(s < t) when the batch is drawn
        assert len(mode.reads) == expected and all("nonzero" in r for r in mode.reads), mode.reads
        assert {"loss", "grad_norm", "lr"} <= set(stats) and all(isinstance(v, float) for v in stats.values())
        bins = [k for k in stats if k.startswith("loss_t")]
        assert bins and all(stats[k] == stats[k] for k in bins)  # empty t bins are left out, not NaN
