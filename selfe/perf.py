"""Throughput bookkeeping: model FLOPs, device peaks and MFU (pure torch, no Ray)."""

from __future__ import annotations

import torch

from selfe.core.model import ModelConfig, flops_per_token

# Dense peak TFLOP/s by (device-name substring, dtype); first match wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 125.0, "fp32": 31.2}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
]


def device_peak_flops(device: torch.device | str, dtype: str, configured_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of a device for ``dtype`` ("bf16"/"fp32"): ``configured_tflops`` when given (any
    device), else the CUDA device's entry in ``PEAK_TFLOPS``; None if unknown (CPUs)."""
    if configured_tflops:
        return configured_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(dtype, 0.0) * 1e12 or None
    return None


def train_flops_per_image(cfg: ModelConfig, n_img: int, n_txt: int, method: str, p_s_equals_t: float) -> float:
    """FLOPs one training image costs: fwd + bwd (3x fwd), plus for Self-E two no-grad forwards on
    the (1 - p_s_equals_t) share of samples with s < t."""
    fwd = flops_per_token(cfg, n_img, n_txt) * n_img
    extra = 2 * (1 - p_s_equals_t) * fwd if method == "self_e" else 0.0
    return 3 * fwd + extra


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_s / peak
