"""RoPE over the whole sequence vs on the image part then re-joined: the model's forward and backward.

    python benchmarks/rope_cat.py                 # CPU, eager, alone: ~1 min
    python benchmarks/rope_cat.py --device cuda --dtype bf16 --width 1024 --blocks 2,4 --batch 32 --side 64

Before 2026-12-07 every attention sliced q and k into text and image parts, rotated the image part with
cos/sin computed from the angles in that call, and concatenated the parts again (``_previous_attention``
below, kept here as the reference); now the tables cover the whole sequence (identity rows for the
text, ``selfe.core.model.rope_2d``) and are computed once per forward. Both run in one process on the
same weights and inputs, alternating; the outputs must be equal to the bit, and the script prints the
median forward+backward time of each.
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple
from unittest import mock

import torch
import torch.nn.functional as F

from selfe.config import load_config
from selfe.core import model as mm


def _previous_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    x2 = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = angles.cos(), angles.sin()
    out = torch.stack([x2[..., 0] * cos - x2[..., 1] * sin, x2[..., 0] * sin + x2[..., 1] * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class _Angles(NamedTuple):
    angles: torch.Tensor
    n_txt: int


def _previous_tables(rows: int, cols: int, head_dim: int, theta: float, device, n_txt: int = 0) -> _Angles:
    """The former ``rope_2d``: the image tokens' angles only."""
    return _Angles(mm.rope_angles(rows, cols, head_dim, theta, device), n_txt)


def _previous_attention(q, k, v, rope: _Angles, key_mask):
    """The former attention: rotate the image part (cos/sin from the angles in every call), re-join."""
    angles, n_txt = rope
    q = torch.cat([q[:, :, :n_txt], _previous_rope(q[:, :, n_txt:], angles)], dim=2)
    k = torch.cat([k[:, :, :n_txt], _previous_rope(k[:, :, n_txt:], angles)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    return out.transpose(1, 2).flatten(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", default="2,4")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--side", type=int, default=32, help="image side; 2x2 patches")
    ap.add_argument("--text", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)
    double, single = (int(b) for b in args.blocks.split(","))
    cfg = load_config(overrides=[f"--model.width={args.width}", "--model.head_dim=64", f"--model.double_blocks={double}",
                                 f"--model.single_blocks={single}", "--model.patch_size=2"]).model
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mm.build_model(cfg, device)
    with torch.no_grad():  # leave adaLN-zero's identity blocks: every block must matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    b = args.batch
    inputs = (torch.randn(b, cfg.in_channels, args.side, args.side, generator=g), torch.rand(b, generator=g),
              torch.rand(b, generator=g) * 0.5, torch.randn(b, args.text, cfg.text_width, generator=g),
              torch.arange(args.text).expand(b, args.text) < args.text // 3, torch.randn(b, cfg.pooled_width, generator=g))
    inputs = tuple(x.to(device) for x in inputs)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16")

    def step(previous: bool) -> tuple[float, torch.Tensor]:
        with mock.patch.object(mm, "attention", _previous_attention if previous else mm.attention), \
                mock.patch.object(mm, "rope_2d", _previous_tables if previous else mm.rope_2d), autocast:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = model(*inputs)
            out.float().pow(2).mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0, out.detach()

    (_, now), (_, before) = step(False), step(True)
    assert torch.equal(now, before), (now - before).abs().max()
    times: dict[str, list[float]] = {"whole sequence (now)": [], "image part + cat (before)": []}
    for _ in range(args.repeats):
        times["whole sequence (now)"].append(step(False)[0])
        times["image part + cat (before)"].append(step(True)[0])
    tokens = cfg.num_tokens(args.side, args.side)
    print(f"{device}, {args.dtype}, width {args.width}, {double}+{single} blocks, batch {b}, {tokens} image + "
          f"{args.text} text tokens, {torch.get_num_threads()} threads; outputs equal to the bit")
    for name, t in times.items():
        t.sort()
        print(f"{name}: median {t[len(t) // 2] * 1e3:.1f} ms per forward+backward over {len(t)}")


if __name__ == "__main__":
    main()
