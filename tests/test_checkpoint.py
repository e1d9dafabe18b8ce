"""Checkpoints in one process: exact round trip, and nothing read back runs code."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from selfe.model import ModelConfig, build_model
from selfe.train.checkpoint import UnsafeCheckpointError, load_checkpoint, load_weights, save_checkpoint
from selfe.train.step import build_optimizer

CFG = ModelConfig(width=32, head_dim=8, double_blocks=1, single_blocks=1, text_width=8, pooled_width=8)


class RunsCode:
    """Unpickling this runs ``touch <marker>``: what an attacker would put in a checkpoint folder."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model, ema = build_model(CFG), build_model(CFG)
    opt = build_optimizer(model, 1e-3, 0.9, 0.95, 0.0)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.rand(2), torch.rand(2), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool),
                torch.randn(2, 8))
    out.square().mean().backward()
    opt.step()
    return model, ema, opt


def _fresh():
    model, ema = build_model(CFG), build_model(CFG)
    return model, ema, build_optimizer(model, 1e-3, 0.9, 0.95, 0.0)


def test_round_trip_restores_weights_optimizer_and_every_rng(tmp_path):
    model, ema, opt = _trained()
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(1), np.random.seed(2), random.seed(3), gen.manual_seed(4)
    save_checkpoint(tmp_path, model, ema, opt, {"step": 1}, gen)
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert (tmp_path / "rng_rank0.safetensors").exists() and not list(tmp_path.glob("*.pt"))

    m2, e2, o2 = _fresh()
    gen2 = torch.Generator()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    assert load_checkpoint(tmp_path, m2, e2, o2, gen2) == {"step": 1}
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen2))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    p0 = next(model.parameters())
    assert torch.equal(opt.state[p0]["exp_avg"], o2.state[next(m2.parameters())]["exp_avg"])
    assert o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_code_running_metadata_pickle_is_refused_and_nothing_runs(tmp_path):
    model, ema, opt = _trained()
    save_checkpoint(tmp_path, model, ema, opt, {"step": 1})
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint .*posix.system|os.system"):
        load_checkpoint(tmp_path, *_fresh())
    with pytest.raises(UnsafeCheckpointError):
        load_weights(tmp_path, build_model(CFG))
    assert not marker.exists()


def test_a_code_running_param_group_is_refused_and_nothing_runs(tmp_path):
    """DCP stores non-tensor values (the optimiser's param groups) as torch.save'd bytes."""
    model, ema, opt = _trained()
    marker = tmp_path / "pwned"
    optim_state = get_optimizer_state_dict(model, opt)
    optim_state["param_groups"][0]["lr"] = RunsCode(str(marker))
    state = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema), "optim": optim_state}
    dcp.save(state, checkpoint_id=str(tmp_path))
    (tmp_path / "progress.json").write_text('{"step": 1}')
    with pytest.raises(UnsafeCheckpointError, match="not plain data"):
        load_checkpoint(tmp_path, *_fresh())
    assert not marker.exists()


def test_a_pickled_rng_file_is_never_read(tmp_path):
    model, ema, opt = _trained()
    save_checkpoint(tmp_path, model, ema, opt, {"step": 1})
    marker = tmp_path / "pwned"
    (tmp_path / "rng_rank0.safetensors").unlink()
    (tmp_path / "rng_rank0.pt").write_bytes(pickle.dumps(RunsCode(str(marker))))
    load_checkpoint(tmp_path, *_fresh())
    assert not marker.exists()
