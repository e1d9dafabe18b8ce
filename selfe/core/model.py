"""FLUX-style MM-DiT with Self-E's two-time conditioning.

The network computes the raw output ``V(x_t, t, s, c)``; the objective turns it into
``G = x_t - t * V``. It knows nothing of losses, EMA or parallelism: FSDP is applied from the
outside (``selfe.train.parallel``) per block in ``double_blocks`` / ``single_blocks``.

Shapes: B batch, N image tokens, L text tokens, D width, H heads, Dh = D / H head width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """Architecture of the MM-DiT. Presets: ``MODEL_PRESETS``."""

    width: int = 128
    """Hidden width D of every token stream."""
    head_dim: int = 32
    """Width of one attention head; D must be divisible by it. Must be a multiple of 4 (2-axis RoPE)."""
    double_blocks: int = 2
    """Double-stream blocks (separate image/text weights, joint attention)."""
    single_blocks: int = 4
    """Single-stream blocks (one weight set over the concatenated sequence)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of D."""
    patch_size: int = 2
    """Side of the square patches the model cuts its input into (2 for VAE latents, 2-4 for pixels)."""
    in_channels: int = 3
    """Channels of the model's input (3 for pixels, 16 for the FLUX VAE)."""
    text_width: int = 384
    """Width of the text encoder's per-token states (384 for MiniLM, 4096 for T5-XXL)."""
    pooled_width: int = 384
    """Width of the pooled text vector (384 for MiniLM, 768 for CLIP-L)."""
    rope_theta: float = 10_000.0
    """RoPE base frequency."""
    time_freq_dim: int = 256
    """Width of the sinusoidal embedding of t and of the gap t - s."""
    abs_pos_embed: bool = False
    """Also add a fixed 2-D sin-cos embedding of each patch's (row, column) to the image tokens, as DiT
    does, on top of RoPE's relative positions. [ours; FLUX: False]"""
    prediction: str = "velocity"
    """What the last layer outputs: "velocity" (V directly, as FLUX and the paper) or "clean" (an
    estimate X of x0, returned as V = (x_t - X) / max(t, clean_t_min) so that every caller still sees
    a velocity and G = x_t - t V = X). Clean prediction is JiT's remedy for pixel-space patches, whose
    noise is high-dimensional while images are not. [ours; paper: velocity]"""
    clean_t_min: float = 0.05
    """Floor on t in the division above, keeping V finite as t -> 0 (JiT)."""

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens of a (C, height, width) latent: one per patch_size x patch_size patch."""
        return (height // self.patch_size) * (width // self.patch_size)

    def validate(self) -> None:
        if self.width % self.head_dim:
            raise ValueError(f"model.width={self.width} is not divisible by model.head_dim={self.head_dim}")
        if self.head_dim % 4:
            raise ValueError(f"model.head_dim={self.head_dim} must be a multiple of 4 for 2-axis RoPE")
        for name in ("width", "patch_size", "in_channels", "text_width", "pooled_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.prediction not in ("velocity", "clean"):
            raise ValueError(f"model.prediction must be 'velocity' or 'clean', got {self.prediction!r}")
        if not 0 < self.clean_t_min <= 1:
            raise ValueError(f"model.clean_t_min must be in (0, 1], got {self.clean_t_min}")
        if self.double_blocks + self.single_blocks < 1:
            raise ValueError("model needs at least one block (double_blocks + single_blocks >= 1)")


MODEL_PRESETS: dict[str, dict] = {
    # ~2.4M parameters: trains on a 2-core CPU in minutes.
    "tiny": dict(width=128, head_dim=32, double_blocks=2, single_blocks=4),
    # The paper's two sizes: FLUX-style 8 double + 16 single blocks.
    "0.5b": dict(width=1024, head_dim=64, double_blocks=8, single_blocks=16),
    "2b": dict(width=2048, head_dim=128, double_blocks=8, single_blocks=16),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalars ``t`` (B,) in [0, 1] -> (B, dim).

    t is multiplied by 1000 so the frequencies cover the unit interval as in DiT/FLUX.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """in_dim -> D -> D with SiLU, used for t, the gap t - s and the pooled text vector."""

    def __init__(self, in_dim: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def rope_angles(rows: int, cols: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """2-axis RoPE angles of the image tokens: half of each head rotates with the row, half with the
    column, row-major token order. Returns (rows * cols, head_dim // 2)."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    r = torch.arange(rows, device=device, dtype=torch.float32)
    c = torch.arange(cols, device=device, dtype=torch.float32)
    ang_r = torch.outer(r, freqs)[:, None, :].expand(rows, cols, quarter)
    ang_c = torch.outer(c, freqs)[None, :, :].expand(rows, cols, quarter)
    return torch.cat([ang_r, ang_c], dim=-1).reshape(rows * cols, 2 * quarter)


def rope_2d(rows: int, cols: int, head_dim: int, theta: float, device: torch.device,
            n_txt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``rope_angles`` after ``n_txt`` text tokens that keep their channels (cos 1, sin 0).

    Returns (cos, sin), each (n_txt + rows * cols, head_dim // 2). Covering the text tokens with the
    identity rotation lets attention rotate q and k whole: no slicing off the image part and no
    concatenation back, and the tables are computed once per forward, not in every block.
    """
    angles = rope_angles(rows, cols, head_dim, theta, device)
    cos, sin = angles.cos(), angles.sin()
    if n_txt:
        cos = torch.cat([cos.new_ones(n_txt, cos.shape[1]), cos])
        sin = torch.cat([sin.new_zeros(n_txt, sin.shape[1]), sin])
    return cos, sin


def sincos_2d(rows: int, cols: int, width: int, device: torch.device) -> torch.Tensor:
    """DiT's fixed position embedding: half the channels encode the row, half the column -> (rows * cols, width)."""
    quarter = width // 4
    freqs = 1.0 / 10_000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    r = torch.arange(rows, device=device, dtype=torch.float32)[:, None] * freqs  # (rows, quarter)
    c = torch.arange(cols, device=device, dtype=torch.float32)[:, None] * freqs
    emb_r = torch.cat([r.sin(), r.cos()], dim=-1)[:, None].expand(rows, cols, 2 * quarter)
    emb_c = torch.cat([c.sin(), c.cos()], dim=-1)[None].expand(rows, cols, 2 * quarter)
    out = torch.cat([emb_r, emb_c], dim=-1).reshape(rows * cols, 4 * quarter)
    return F.pad(out, (0, width - 4 * quarter))


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` (B, H, T, Dh) by the angles whose (cos, sin) ``rope`` holds,
    (T, Dh/2) each; in fp32."""
    cos, sin = rope
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` with its scale cast to the input's dtype. Why: under bf16 autocast q and k arrive
    in bf16 while the scale is an fp32 parameter, and ``rms_norm`` of mixed dtypes falls back to
    unfused element-wise ops returning fp32 (on an H200 about 11% of an eager step went to that
    norm and its casts). The fused kernel still accumulates in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class QKNorm(nn.Module):
    """RMSNorm of queries and keys per head (FLUX): keeps attention logits bounded in bf16."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.q = RMSNorm(head_dim, eps=1e-6)
        self.k = RMSNorm(head_dim, eps=1e-6)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(q), self.k(k)


def attention(q, k, v, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor) -> torch.Tensor:
    """Joint attention over [text; image] tokens; RoPE rotates the image part (``rope_2d``: the text
    part's rotation is the identity).

    q, k, v: (B, H, L + N, Dh); rope: (cos, sin), (L + N, Dh/2) each; key_mask: (B, L + N) bool,
    True = attend. Returns (B, L + N, H * Dh).
    """
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    return out.transpose(1, 2).flatten(2)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, mixed by one joint attention."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = width // head_dim
        hidden = int(width * mlp_ratio)
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", nn.Linear(width, 6 * width))
            self.add_module(f"{stream}_norm1", nn.LayerNorm(width, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{stream}_qkv", nn.Linear(width, 3 * width))
            self.add_module(f"{stream}_qknorm", QKNorm(head_dim))
            self.add_module(f"{stream}_proj", nn.Linear(width, width))
            self.add_module(f"{stream}_norm2", nn.LayerNorm(width, elementwise_affine=False, eps=1e-6))
            self.add_module(
                f"{stream}_mlp",
                nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)),
            )

    def _qkv(self, stream: str, x: torch.Tensor, shift, scale):
        h = modulate(getattr(self, f"{stream}_norm1")(x), shift, scale)
        q, k, v = getattr(self, f"{stream}_qkv")(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = getattr(self, f"{stream}_qknorm")(q, k)
        return q, k, v  # each (B, H, T, Dh)

    def forward(self, img, txt, vec, rope, key_mask):
        img_mod = self.img_mod(F.silu(vec)).chunk(6, dim=-1)
        txt_mod = self.txt_mod(F.silu(vec)).chunk(6, dim=-1)
        qi, ki, vi = self._qkv("img", img, img_mod[0], img_mod[1])
        qt, kt, vt = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        n_txt = txt.shape[1]
        attn = attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), rope, key_mask)
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]
        img = img + img_mod[2][:, None] * self.img_proj(img_attn)
        img = img + img_mod[5][:, None] * self.img_mlp(modulate(self.img_norm2(img), img_mod[3], img_mod[4]))
        txt = txt + txt_mod[2][:, None] * self.txt_proj(txt_attn)
        txt = txt + txt_mod[5][:, None] * self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod[3], txt_mod[4]))
        return img, txt


class SingleStreamBlock(nn.Module):
    """FLUX single-stream block: attention and MLP computed in parallel from one fused projection."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = width // head_dim
        self.hidden = int(width * mlp_ratio)
        self.mod = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(width, 3 * width + self.hidden)
        self.qknorm = QKNorm(head_dim)
        self.linear2 = nn.Linear(width + self.hidden, width)

    def forward(self, x, vec, rope, key_mask):
        shift, scale, gate = self.mod(F.silu(vec)).chunk(3, dim=-1)
        h = self.linear1(modulate(self.norm(x), shift, scale))
        qkv, mlp = h.split([3 * x.shape[-1], self.hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.qknorm(q, k)
        attn = attention(q, k, v, rope, key_mask)
        return x + gate[:, None] * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.mod = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x, vec):
        shift, scale = self.mod(F.silu(vec)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MMDiT(nn.Module):
    """V(x_t, t, s, c): the raw network output of Self-E (a velocity when s = t)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        self.img_in = nn.Linear(cfg.in_channels * p * p, d)
        self.txt_in = nn.Linear(cfg.text_width, d)
        self.t_embed = MLPEmbedder(cfg.time_freq_dim, d)
        # The paper embeds the gap t - s, not s: s = t (evaluation mode) is then always "gap 0".
        self.gap_embed = MLPEmbedder(cfg.time_freq_dim, d)
        self.pooled_embed = MLPEmbedder(cfg.pooled_width, d)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.double_blocks)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.single_blocks)
        )
        self.final = FinalLayer(d, cfg.in_channels * p * p)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier linears, N(0, 0.02) embedders, and adaLN-zero.

        Zeroing every modulation (and so every gate) makes each block the identity at init, and
        zeroing the output layer makes V = 0: training starts from a stable residual network (DiT).
        Separate from ``__init__`` so a model built on the meta device can be materialised after
        sharding (``to_empty`` then ``init_weights``).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        for emb in (self.t_embed, self.gap_embed, self.pooled_embed):
            nn.init.normal_(emb.fc1.weight, std=0.02)
            nn.init.normal_(emb.fc2.weight, std=0.02)
        zero = [self.final.mod, self.final.linear]
        for block in self.double_blocks:
            zero += [block.img_mod, block.txt_mod]
        for block in self.single_blocks:
            zero.append(block.mod)
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        txt: torch.Tensor,
        txt_mask: torch.Tensor,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, C, H, W) at noise level t (B,), landing level s (B,) with s <= t;
        txt (B, L, text_width), txt_mask (B, L) bool, pooled (B, pooled_width) -> V (B, C, H, W)."""
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not divisible by model.patch_size={p}")
        rows, cols = h // p, w // p
        # Patchify: (B, C, H, W) -> (B, N, C * p * p), row-major over patches.
        img = x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c * p * p)
        img = self.img_in(img)  # (B, N, D)
        if self.cfg.abs_pos_embed:
            img = img + sincos_2d(rows, cols, img.shape[-1], x.device).to(img.dtype)
        txt_h = self.txt_in(txt)  # (B, L, D)
        vec = (
            self.t_embed(timestep_embedding(t, self.cfg.time_freq_dim).to(img.dtype))
            + self.gap_embed(timestep_embedding(t - s, self.cfg.time_freq_dim).to(img.dtype))
            + self.pooled_embed(pooled.to(img.dtype))
        )  # (B, D)
        n_txt = txt_h.shape[1]
        rope = rope_2d(rows, cols, self.cfg.head_dim, self.cfg.rope_theta, x.device, n_txt)
        key_mask = torch.cat([txt_mask.bool(), txt_mask.new_ones(b, rows * cols, dtype=torch.bool)], dim=1)
        for block in self.double_blocks:
            img, txt_h = block(img, txt_h, vec, rope, key_mask)
        seq = torch.cat([txt_h, img], dim=1)  # (B, L + N, D)
        for block in self.single_blocks:
            seq = block(seq, vec, rope, key_mask)
        out = self.final(seq[:, n_txt:], vec)  # (B, N, C * p * p)
        # Unpatchify back to (B, C, H, W).
        out = out.reshape(b, rows, cols, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        if self.cfg.prediction == "clean":
            return (x - out) / t.view(-1, 1, 1, 1).to(out.dtype).clamp_min(self.cfg.clean_t_min)
        return out


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> MMDiT:
    """Build and initialise a model on ``device`` (use "meta" to count parameters without memory)."""
    with torch.device(device):
        model = MMDiT(cfg)
    if str(device) != "meta":
        model.init_weights()
    return model


def flops_per_token(cfg: ModelConfig, n_img: int, n_txt: int) -> float:
    """Forward FLOPs per image token (2 * matmul MACs, attention included), for MFU.

    Text-token work is charged to the image tokens so that tokens/s * this = FLOP/s.
    """
    d, hid = cfg.width, int(cfg.width * cfg.mlp_ratio)
    seq = n_img + n_txt
    double = 2 * (4 * d * d + 2 * d * hid) * seq + 2 * 2 * seq * seq * d
    single = 2 * (3 * d * d + d * hid + (d + hid) * d) * seq + 2 * 2 * seq * seq * d
    total = cfg.double_blocks * double + cfg.single_blocks * single
    return total / n_img
