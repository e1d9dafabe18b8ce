"""Checkpoints in one process: exact round trip, nothing read back runs code, a corrupt latest
checkpoint falls back to an older one."""

from __future__ import annotations

import json
import warnings
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from selfe.config import OptimConfig
from selfe.core.model import ModelConfig, build_model
from selfe.train.checkpoint import (
    UnsafeCheckpointError, load_checkpoint, load_weights, save_checkpoint, save_checkpoint_async, split_optimizer_state,
    verify_checkpoint,
)
from selfe.train.resume import UNUSABLE, remove_unregistered, restore_first_usable, unusable_checkpoints
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
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.rand(2), torch.rand(2), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool),
                torch.randn(2, 8))
    out.square().mean().backward()
    opt.step()
    return model, ema, opt


def _fresh():
    model, ema = build_model(CFG), build_model(CFG)
    return model, ema, build_optimizer(model, OptimConfig(lr=1e-3))


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
    for p, q in zip(model.parameters(), m2.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], o2.state[q][key]), key
    assert o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_background_write_holds_the_state_of_its_call_not_of_later_steps(tmp_path):
    """save_checkpoint_async copies the state when called: weights, Adam moments and RNG changed right
    after it (the next training step) do not reach the files, which equal a synchronous save's."""
    model, ema, opt = _trained()
    gen = torch.Generator().manual_seed(7)
    save_checkpoint(tmp_path / "sync", model, ema, opt, {"step": 1}, gen)
    written = save_checkpoint_async(tmp_path / "async", model, ema, opt, {"step": 1}, gen)
    with torch.no_grad():  # the training loop goes on at once
        for p in model.parameters():
            p.add_(1.0)
        for state in opt.state.values():
            state["exp_avg"].mul_(-3.0)
    gen.manual_seed(123)
    assert written.result(timeout=60) >= 0
    assert verify_checkpoint(tmp_path / "async") == []
    for name in ("sync", "async"):
        m2, e2, o2 = _fresh()
        gen2 = torch.Generator()
        assert load_checkpoint(tmp_path / name, m2, e2, o2, gen2) == {"step": 1}
        loaded = [p.detach().clone() for p in m2.parameters()], [o2.state[q]["exp_avg"] for q in m2.parameters()]
        loaded += (torch.rand(3, generator=gen2),)
        if name == "sync":
            expected = loaded
    assert all(torch.equal(a, b) for a, b in zip(expected[0], loaded[0]))
    assert all(torch.equal(a, b) for a, b in zip(expected[1], loaded[1]))
    assert torch.equal(expected[2], loaded[2])
    assert not any(torch.equal(a, b) for a, b in zip(loaded[0], model.parameters()))


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
    optim_state = split_optimizer_state(get_optimizer_state_dict(model, opt))
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


def test_the_manifest_catches_a_truncated_shard_and_is_written_last(tmp_path):
    model, ema, opt = _trained()
    save_checkpoint(tmp_path, model, ema, opt, {"step": 1})
    assert verify_checkpoint(tmp_path) == [] and not list(tmp_path.glob(".*.tmp"))
    shard = next(tmp_path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    (problem,) = verify_checkpoint(tmp_path)
    assert shard.name in problem and "expected" in problem


def _run_with_checkpoints(run_dir, steps=(1, 2)):
    """Checkpoints of one model at ``steps`` under run_dir, registered in a Ray Train-style snapshot."""
    names = []
    for step in steps:
        model, ema, opt = _trained(seed=step)
        name = f"checkpoint_{step}"
        save_checkpoint(run_dir / name, model, ema, opt, {"step": step})
        names.append(name)
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n} for n in names]}
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return [run_dir / n for n in names]


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    import ray.train

    older, latest = _run_with_checkpoints(tmp_path)
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # a corrupt latest checkpoint
    model, ema, opt = _fresh()
    load = lambda d: load_checkpoint(d, model, ema, opt)  # noqa: E731
    with pytest.warns(UserWarning, match="checkpoint_2 is unusable .*expected.*set aside"):
        progress, path = restore_first_usable(ray.train.Checkpoint(str(latest)), load, mark=True)
    assert progress == {"step": 1} and path.endswith("checkpoint_1")
    for a, b in zip(_trained(seed=1)[0].parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert "expected" in json.loads((latest / UNUSABLE).read_text())["reason"]
    assert unusable_checkpoints(str(tmp_path)) == ["checkpoint_2"]  # the next job start keeps it out of the count
    shard.unlink()  # set aside: a later restart does not read it again (here it would now fail differently)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert restore_first_usable(ray.train.Checkpoint(str(latest)), load, mark=True)[0] == {"step": 1}
    assert not [w for w in seen if "unusable" in str(w.message)]
    (older / ".metadata").unlink()  # and now neither is usable
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no usable checkpoint to resume from: tried "
                                                                      ".*checkpoint_2 \\(set aside earlier\\)"):
        restore_first_usable(ray.train.Checkpoint(str(latest)), load)


def test_checkpoint_folders_ray_never_registered_are_removed(tmp_path):
    kept = _run_with_checkpoints(tmp_path)
    (tmp_path / "checkpoint_3").mkdir()  # written, never reported
    assert remove_unregistered(str(tmp_path)) == ["checkpoint_3"]
    assert all(p.is_dir() for p in kept) and not (tmp_path / "checkpoint_3").exists()
    assert remove_unregistered(str(tmp_path / "no-run-yet")) == []
    stopped_early = tmp_path / "stopped-before-its-first-report"  # no snapshot: Ray starts it from step 0
    (stopped_early / "checkpoint_1").mkdir(parents=True)
    (stopped_early / "mlflow-spool").mkdir()
    assert remove_unregistered(str(stopped_early)) == ["checkpoint_1"]
    assert (stopped_early / "mlflow-spool").is_dir()
