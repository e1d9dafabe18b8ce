"""The single-process reference loop (no Ray): both objectives learn a trivially learnable task."""

import pytest
import torch

from selfe.config import load_config
from selfe.core.sampling import SamplerConfig, resolve_sampler, sample
from selfe.core.types import Batch, TextCond
from selfe.train.local import train_local


def _batches(batch=16, seed=0):
    """Class k in {0, 1, 2} <-> an image whose channel k is +0.8 and the others -0.8."""
    g = torch.Generator().manual_seed(seed)
    while True:
        labels = torch.randint(0, 3, (batch,), generator=g)
        x0 = torch.full((batch, 3, 8, 8), -0.8)
        x0[torch.arange(batch), labels] = 0.8
        tokens = torch.zeros(batch, 4, 8)
        tokens[torch.arange(batch), :, labels] = 1.0
        yield Batch(x0, TextCond(tokens, torch.ones(batch, 4, dtype=torch.bool), tokens[:, 0].clone()))


@pytest.mark.parametrize("method", ["self_e", "flow_matching"])
def test_reference_loop_learns_class_colours(method):
    cfg = load_config(overrides=[
        f"--objective.method={method}", "--model.width=64", "--model.head_dim=16", "--model.double_blocks=1",
        "--model.single_blocks=1", "--model.patch_size=2", "--model.text_width=8", "--model.pooled_width=8",
        "--optim.warmup_steps=10", "--optim.lr=2e-3", "--ema.decay=0.9", "--train.steps=100", "--data.resolution=8", "--train.compile=false",
    ])
    null = TextCond(torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 8))
    model, ema, history = train_local(cfg, _batches(), null, cfg.model.num_tokens(8, 8))
    first = sum(h["loss"] for h in history[:10]) / 10
    last = sum(h["loss"] for h in history[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert all(torch.isfinite(torch.tensor(h["grad_norm"])) for h in history)
    # two-step samples of the EMA model are the right colour for each class
    test = next(_batches(batch=12, seed=1))
    out, _ = sample(ema, torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(2)), test.cond, null,
                    resolve_sampler(SamplerConfig(guidance=2.0), method, 2),
                    cfg.shift_mu((8, 8)))
    predicted = out.mean(dim=(2, 3)).argmax(dim=1)
    expected = test.x0.mean(dim=(2, 3)).argmax(dim=1)
    assert (predicted == expected).float().mean() >= 0.9
