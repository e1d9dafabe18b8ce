"""benchmarks/scaling_plan.py: the on-paper step time at 8 and 64 GPUs, checked by hand."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_plan.py"


def _load():
    spec = importlib.util.spec_from_file_location("scaling_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling_plan"] = module
    spec.loader.exec_module(module)
    return module


def test_the_formula_by_hand():
    sp = _load()
    links = sp.Links(nvlink_gbyte_s=360.0, net_gbyte_s=50.0, efficiency=0.8)
    # 1e9 parameters, 10 units, Self-E: 4 bf16 gathers (8 GB) + fp32 gradients (4 GB) = 12 GB per step.
    one = sp.plan_step(1e9, 10, 0.5, 0.3, 32, 1, "fsdp", links)
    assert (one.comm_s, one.step_s, one.mfu) == (0.0, 0.5, 0.3)
    node = sp.plan_step(1e9, 10, 0.5, 0.3, 32, 8, "fsdp", links)
    assert node.comm_s == pytest.approx(12e9 * 7 / 8 / 360e9)
    assert node.step_s == pytest.approx(0.5 + node.comm_s / 10)  # hidden but the first gather/last reduce
    # 64 GPUs over 40 GB/s of network: 12 GB x 63/64 / 40 GB/s = 0.295 s, still under 0.5 s of compute.
    fsdp = sp.plan_step(1e9, 10, 0.5, 0.3, 32, 64, "fsdp", links)
    assert fsdp.comm_s == pytest.approx(12e9 * 63 / 64 / 40e9)
    # HSDP: the same 12 GB inside the node, plus an all-reduce of 4 GB / 8 across the 8 nodes.
    hsdp = sp.plan_step(1e9, 10, 0.5, 0.3, 32, 64, "hsdp", links)
    assert hsdp.comm_s == pytest.approx(12e9 * 7 / 8 / 360e9 + 2 * 7 / 8 * 4e9 / 8 / 40e9)
    assert hsdp.step_s < fsdp.step_s
    # A step too short to hide the network: communication sets the pace and MFU falls with it.
    bound = sp.plan_step(1e9, 10, 0.1, 0.3, 8, 64, "fsdp", links)
    assert bound.step_s == pytest.approx(bound.comm_s * 1.1) and bound.mfu == pytest.approx(0.3 * 0.1 / bound.step_s)
    # Flow matching gathers twice, not four times.
    fm = sp.plan_step(1e9, 10, 0.5, 0.3, 32, 8, "fsdp", links, gathers=sp.GATHERS_FLOW_MATCHING)
    assert fm.comm_s == pytest.approx(8e9 * 7 / 8 / 360e9)


def test_the_05b_table_has_8_and_64_gpus():
    table = _load().main(["--gpus", "1", "8", "64"])
    rows = [line for line in table.splitlines()[2:]]
    assert [r.split("|")[1:3] for r in rows] == [[" 1 ", " fsdp "], [" 8 ", " fsdp "], [" 64 ", " fsdp "],
                                                 [" 64 ", " hsdp "]]
