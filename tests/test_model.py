"""MM-DiT: shapes, gradients, determinism, the two-time embedding and the paper's sizes."""

from dataclasses import replace

import pytest
import torch

from selfe.core.model import MODEL_PRESETS, ModelConfig, build_model, flops_per_token


def _inputs(cfg: ModelConfig, b=2, res=16, n_txt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, res, res, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    s = t * torch.rand(b, generator=g)
    txt = torch.randn(b, n_txt, cfg.text_width, generator=g)
    mask = torch.ones(b, n_txt, dtype=torch.bool)
    mask[0, 3:] = False
    pooled = torch.randn(b, cfg.pooled_width, generator=g)
    return x, t, s, txt, mask, pooled


def _reduced(preset: str) -> ModelConfig:
    # Real width/head size of each preset, one block of each kind so the test stays fast on CPU.
    kw = dict(MODEL_PRESETS[preset], double_blocks=1, single_blocks=1, text_width=32, pooled_width=16)
    if preset == "2b":
        kw.update(mlp_ratio=1.0)  # keeps the 2B-width block under ~100M params on a CPU test box
    return ModelConfig(**kw)


def _perturb_adaln(model):
    # adaLN-zero makes the output exactly 0 at init; give the zero layers small weights so
    # gradients and outputs depend on every input.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)


def _live_tiny(seed: int) -> tuple:
    """(config, a tiny model whose outputs depend on every input, its inputs)."""
    cfg = ModelConfig(**MODEL_PRESETS["tiny"], patch_size=4)
    torch.manual_seed(seed)
    model = build_model(cfg)
    _perturb_adaln(model)
    return cfg, model, _inputs(cfg)


@pytest.mark.parametrize("preset", ["tiny", "0.5b", "2b"])
def test_preset_shapes_gradients_determinism(preset):
    cfg = _reduced(preset)
    torch.manual_seed(0)
    model = build_model(cfg)
    _perturb_adaln(model)
    x, t, s, txt, mask, pooled = _inputs(cfg)
    out = model(x, t, s, txt, mask, pooled)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    torch.manual_seed(0)
    model2 = build_model(cfg)
    _perturb_adaln(model2)
    assert torch.equal(model2(x, t, s, txt, mask, pooled), out.detach())


def test_adaln_zero_init_outputs_zero():
    cfg = ModelConfig(**MODEL_PRESETS["tiny"])
    model = build_model(cfg)
    out = model(*_inputs(cfg))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("preset,target", [("0.5b", 0.5e9), ("2b", 2e9)])
def test_paper_sizes_within_15_percent(preset, target):
    cfg = ModelConfig(**MODEL_PRESETS[preset], in_channels=16, text_width=4096, pooled_width=768)
    model = build_model(cfg, "meta")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - target) / target < 0.15, n
    assert len(model.double_blocks) == 8 and len(model.single_blocks) == 16


def test_tiny_is_under_5m():
    n = sum(p.numel() for p in build_model(ModelConfig(**MODEL_PRESETS["tiny"]), "meta").parameters())
    assert n <= 5e6


def test_gap_not_landing_time_is_embedded():
    """V depends on (t, t - s): shifting s changes the output, and s = t is the same 'gap 0' for any t."""
    cfg, model, (x, t, s, txt, mask, pooled) = _live_tiny(1)
    a = model(x, t, s, txt, mask, pooled)
    b = model(x, t, s * 0.5, txt, mask, pooled)
    assert not torch.allclose(a, b)
    gap_emb = model.gap_embed
    from selfe.core.model import timestep_embedding
    e1 = gap_emb(timestep_embedding(torch.tensor([0.3]) - torch.tensor([0.3]), cfg.time_freq_dim))
    e2 = gap_emb(timestep_embedding(torch.tensor([0.8]) - torch.tensor([0.8]), cfg.time_freq_dim))
    assert torch.equal(e1, e2)


def test_padding_tokens_are_ignored():
    cfg, model, (x, t, s, txt, mask, pooled) = _live_tiny(2)
    txt2 = txt.clone()
    txt2[0, 3:] = 100.0  # masked positions of sample 0
    a = model(x, t, s, txt, mask, pooled)
    b = model(x, t, s, txt2, mask, pooled)
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_rejects_indivisible_input():
    cfg = ModelConfig(**MODEL_PRESETS["tiny"], patch_size=4)
    model = build_model(cfg)
    x, t, s, txt, mask, pooled = _inputs(cfg, res=18)
    with pytest.raises(ValueError, match="patch_size"):
        model(x, t, s, txt, mask, pooled)


def test_flops_scale_with_width():
    small = flops_per_token(ModelConfig(width=128, head_dim=32), 64, 32)
    big = flops_per_token(ModelConfig(width=256, head_dim=32), 64, 32)
    assert 3.0 < big / small < 4.1


def test_absolute_positions_tell_every_patch_apart_and_change_the_output():
    from selfe.core.model import sincos_2d

    emb = sincos_2d(8, 8, 130, torch.device("cpu"))
    assert emb.shape == (64, 130) and torch.all(emb[:, 128:] == 0)  # padded to the width
    dist = torch.cdist(emb, emb) + torch.eye(64) * 1e9
    assert dist.min() > 0.05  # no two (row, column) cells share an embedding
    # The same weights with the option on see different inputs: the output changes.
    cfg = ModelConfig(width=64, head_dim=16, double_blocks=1, single_blocks=1, patch_size=4, text_width=8,
                      pooled_width=8)
    plain = build_model(cfg)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.05)
    with_pos = build_model(replace(cfg, abs_pos_embed=True))
    with_pos.load_state_dict(plain.state_dict())
    args = (torch.randn(2, 3, 32, 32), torch.full((2,), 0.5), torch.full((2,), 0.5), torch.randn(2, 3, 8),
            torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 8))
    assert not torch.allclose(plain(*args), with_pos(*args), atol=1e-4)


def test_clean_prediction_returns_a_velocity_whose_jump_is_the_network_output():
    cfg = ModelConfig(width=32, head_dim=8, double_blocks=1, single_blocks=1, text_width=32, pooled_width=16)
    raw = build_model(cfg)
    _perturb_adaln(raw)
    clean = build_model(replace(cfg, prediction="clean"))
    clean.load_state_dict(raw.state_dict())
    x, t, s, txt, mask, pooled = _inputs(cfg)
    t = torch.tensor([0.5, 0.02])  # one above and one below clean_t_min = 0.05
    out, v = raw(x, t, s.clamp(max=0.02), txt, mask, pooled), clean(x, t, s.clamp(max=0.02), txt, mask, pooled)
    jump = x - t.view(-1, 1, 1, 1) * v  # G = x_t - t V, what the objective and the sampler use
    assert torch.allclose(jump[0], out[0], atol=1e-5)  # G is the network's clean estimate
    assert torch.allclose(v[1], (x[1] - out[1]) / 0.05, atol=1e-4)  # the floor keeps V finite near 0
    with pytest.raises(ValueError, match="model.prediction must be"):
        ModelConfig(prediction="eps").validate()




def test_qk_norm_stays_in_the_compute_dtype_under_autocast():
    # An fp32 scale on bf16 input made rms_norm fall back to unfused ops returning fp32 (then cast back
    # for attention): the norm must return the input's dtype and agree with the fp32 norm.
    from selfe.core.model import RMSNorm

    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(2, 4, 7, 16)
    reference = norm(x)
    assert reference.dtype == torch.float32
    torch.testing.assert_close(reference, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
