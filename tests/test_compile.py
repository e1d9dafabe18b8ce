"""Compiled blocks: every variant a Self-E step needs compiles during warm-up, none after."""

from __future__ import annotations

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from selfe.config import load_config
from selfe.core.ema import make_ema
from selfe.core.model import build_model
from selfe.core.objective import SelfEObjective
from selfe.core.sampling import SamplerConfig, sample
from selfe.core.types import Batch, TextCond
from selfe.train.parallel import compile_blocks
from selfe.train.step import Trainee, build_optimizer, train_step

WARM_UP = 4


def _cond(b: int, length: int, width: int, generator: torch.Generator) -> TextCond:
    mask = torch.arange(length).expand(b, length) < 10
    return TextCond(torch.randn(b, length, width, generator=generator), mask, torch.randn(b, width, generator=generator))


def test_a_compiled_self_e_run_recompiles_nothing_after_warm_up() -> None:
    """The tiny recipe's step (online forward with gradients, EMA and online self-evaluation passes on a
    subset whose size changes every step, one row while tau = 0) and the sampler's guided batches. With
    dynamo's default limit of 8 graphs per code object, DoubleStreamBlock needed a 9th and fell back to
    eager; ``fail_on_recompile_limit_hit`` turns that into an error here."""
    cfg = load_config(overrides=["--objective.anneal_steps=3"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ema = make_ema(model)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager")  # the guards are inductor's; aot_eager compiles in seconds
    compile_blocks(ema, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    length, width = cfg.text.max_tokens, cfg.model.text_width
    null = TextCond(torch.zeros(1, length, width), torch.ones(1, length, dtype=torch.bool), torch.zeros(1, width))
    tr = Trainee(model, ema, SelfEObjective(cfg.objective, 64), build_optimizer(model, cfg.optim), 1.0, None, g)
    graphs = []
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step in range(WARM_UP + 12):
            batch = Batch(torch.randn(16, 3, 16, 16, generator=g), _cond(16, length, width, g))
            train_step(tr, batch, null, step, 1e-3, 0.99)
            graphs.append(counters["stats"]["unique_graphs"])
        for b in (16, 5):  # an evaluation batch and a remainder, guided (2B rows)
            sample(ema, torch.randn(b, 3, 16, 16, generator=g), _cond(b, length, width, g), null,
                   SamplerConfig(steps=2, guidance=2.0, eta=1.0, landing="next"))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0
    assert graphs[WARM_UP:] == [graphs[WARM_UP - 1]] * len(graphs[WARM_UP:]), graphs
