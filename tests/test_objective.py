"""The Self-E objective against the method's equations."""

import pytest
import torch
from torch import nn

from selfe.core.objective import (
    Draws, ObjectiveConfig, SelfEObjective, TextCond, denoise, energy_preserving_target, sample_times,
    self_eval_lambda, shift_time, tau_at, time_shift_mu,
)
from tests.analytic import GaussianMixture, cond_for


class LinearNet(nn.Module):
    """V = w * x + b * t-gap: tiny differentiable net with the model's signature, recording its calls."""

    def __init__(self, w: float, name: str, log: list):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.name, self.log = name, log

    def forward(self, x, t, s, tokens, mask, pooled):
        self.log.append((self.name, tokens.detach().clone(), torch.is_grad_enabled()))
        return self.w * x + 0.1 * (t - s).view(-1, 1, 1, 1) + tokens.mean() * 0.01


def _data(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 4, 4, generator=g)
    cond = TextCond(torch.randn(b, 5, 6, generator=g) + 3, torch.ones(b, 5, dtype=torch.bool), torch.randn(b, 6, generator=g))
    null = TextCond(torch.zeros(1, 5, 6), torch.ones(1, 5, dtype=torch.bool), torch.zeros(1, 6))
    return x0, cond, null


def _draws(x0, t, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Draws(torch.zeros(x0.shape[0], dtype=torch.bool), t, s, torch.randn(x0.shape, generator=g))


def test_s_equals_t_is_flow_matching():
    x0, cond, null = _data()
    t = torch.linspace(0.05, 0.95, 8)
    log = []
    net, ema = LinearNet(0.3, "online", log), LinearNet(-0.2, "ema", log)
    d = _draws(x0, t, t.clone())
    se = SelfEObjective(ObjectiveConfig(method="self_e"), 64)(net, ema, x0, cond, null, 10_000, draws=d)
    fm = SelfEObjective(ObjectiveConfig(method="flow_matching"), 64)(net, ema, x0, cond, null, 10_000, draws=d)
    # lambda = 0, target = x0, and the 1/t^2 weighted x0-space loss equals the velocity MSE.
    assert se.stats["lambda_mean"] == 0.0
    assert torch.equal(se.loss, fm.loss)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * d.eps
    with torch.no_grad():
        v = net(x_t, t, t, cond.tokens, cond.mask, cond.pooled)
        x0_hat = x_t - t.view(-1, 1, 1, 1) * v
        weighted = ((x0_hat - x0) ** 2).flatten(1).mean(1) / t**2
        velocity = ((v - (d.eps - x0)) ** 2).flatten(1).mean(1)
    assert torch.allclose(weighted.mean(), velocity.mean(), rtol=1e-5)
    assert torch.allclose(fm.loss.detach(), velocity.mean(), rtol=1e-6)
    # and the target of every sample equals x0 exactly
    assert torch.equal(energy_preserving_target(x0, torch.randn_like(x0), torch.zeros(8)), x0)


def test_self_eval_weight_zero_gives_flow_matching_loss():
    x0, cond, null = _data()
    t = torch.linspace(0.1, 0.9, 8)
    s = t * 0.5
    log = []
    net, ema = LinearNet(0.3, "online", log), LinearNet(-0.2, "ema", log)
    d = _draws(x0, t, s)
    out = SelfEObjective(ObjectiveConfig(self_eval_weight=0.0), 64)(net, ema, x0, cond, null, 0, draws=d)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * d.eps
    with torch.no_grad():
        v = net(x_t, t, s, cond.tokens, cond.mask, cond.pooled)
    assert torch.equal(out.loss.detach(), ((v - (d.eps - x0)) ** 2).flatten(1).mean(1).mean())
    assert out.stats["lambda_mean"] == 0.0


def test_renormalised_target_keeps_x0_norm():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 3, 8, 8, generator=g)
    x_self = 3 * torch.randn(6, 3, 8, 8, generator=g)
    lam = torch.tensor([0.0, 0.1, 0.5, 1.0, 5.0, 50.0])
    tgt = energy_preserving_target(x0, x_self, lam, renorm=True)
    assert torch.allclose(tgt.flatten(1).norm(dim=1), x0.flatten(1).norm(dim=1), rtol=1e-5)
    plain = energy_preserving_target(x0, x_self, lam, renorm=False)
    assert torch.allclose(plain, (x0 + lam.view(-1, 1, 1, 1) * x_self) / (1 + lam.view(-1, 1, 1, 1)), atol=1e-6)
    assert not torch.allclose(tgt[1:], plain[1:])


def test_branches_use_ema_for_conditional_and_online_for_unconditional():
    x0, cond, null = _data()
    t = torch.full((8,), 0.8)
    s = torch.tensor([0.8, 0.2, 0.8, 0.3, 0.8, 0.4, 0.8, 0.5])  # half s < t
    log = []
    net, ema = LinearNet(0.3, "online", log), LinearNet(-0.2, "ema", log)
    SelfEObjective(ObjectiveConfig(), 64)(net, ema, x0, cond, null, 0, draws=_draws(x0, t, s))
    assert [name for name, _, _ in log] == ["online", "ema", "online"]
    (_, tok0, grad0), (_, tok_ema, grad_ema), (_, tok_u, grad_u) = log
    assert grad0 and not grad_ema and not grad_u
    assert tok_ema.shape[0] == 4 and tok_u.shape[0] == 4  # only the s < t rows are evaluated
    assert torch.equal(tok_ema, cond.tokens[1::2])  # conditional prompts go to the EMA net
    assert torch.count_nonzero(tok_u) == 0  # the null prompt goes to the online net


def test_ema_weights_change_the_target_and_online_weights_shape_it():
    """Delta = G_online(x_s, null) - G_ema(x_s, c): with the same function in both, Delta = 0 and
    x_self is the model's own prediction; different EMA weights move the gradient."""
    x0, cond, null = _data()
    null = TextCond(cond.tokens[:1], cond.mask[:1], cond.pooled[:1])
    cond = null.expand(8)  # same prompt in both branches
    t = torch.full((8,), 0.7)
    s = torch.full((8,), 0.3)
    grads = []
    for w_ema in (0.3, 0.9):
        log = []
        net, ema = LinearNet(0.3, "online", log), LinearNet(w_ema, "ema", log)
        out = SelfEObjective(ObjectiveConfig(), 64)(
            net, ema, x0, cond, null, 0, generator=torch.Generator().manual_seed(5), draws=_draws(x0, t, s)
        )
        out.loss.backward()
        grads.append(net.w.grad.item())
        if w_ema == 0.3:
            assert out.stats["delta_rms"] < 1e-6
    assert abs(grads[0] - grads[1]) > 1e-4


def test_fake_score_switches_on_at_aux_start():
    x0, cond, null = _data()
    t, s = torch.full((8,), 0.7), torch.full((8,), 0.3)
    cfg = ObjectiveConfig(fake_score=True, aux_start_step=100)
    fake = TextCond(cond.tokens - 10, cond.mask, cond.pooled)
    for step, calls in ((99, 3), (100, 4)):
        log = []
        out = SelfEObjective(cfg, 64)(LinearNet(0.3, "online", log), LinearNet(0.1, "ema", log), x0, cond, null, step,
                                  fake_cond=fake, draws=_draws(x0, t, s))
        assert len(log) == calls
        assert ("loss_fake" in out.stats) == (step >= 100)
    assert log[-1][2] is True and torch.equal(log[-1][1], fake.tokens)  # L_fake carries gradient
    with pytest.raises(ValueError, match="fake"):
        SelfEObjective(cfg, 64)(LinearNet(0.3, "o", []), LinearNet(0.1, "e", []), x0, cond, null, 100, draws=_draws(x0, t, s))


def test_time_sampling_follows_schedule():
    cfg = ObjectiveConfig(anneal_steps=1000)
    g = torch.Generator().manual_seed(0)
    t, s = sample_times(20000, 0.5, 0, cfg, "cpu", g)
    assert torch.equal(t, s)  # tau = 0 at step 0: every s collapses to t
    t, s = sample_times(20000, 0.5, 500, cfg, "cpu", g)
    below = s < t
    assert 0.45 < below.float().mean() < 0.55
    assert torch.all(s[below] >= 0.5 * t[below] - 1e-6)  # tau = 0.5: s in [(1 - tau) t, t]
    assert tau_at(500, cfg) == 0.5 and tau_at(5000, cfg) == 1.0
    assert t.max() <= 1 - 1e-4 and t.min() > 0
    # shift pushes mass towards noise: median t above 0.5 with mu = 0.5
    assert t.median() > 0.55
    assert time_shift_mu(256) == 0.5 and time_shift_mu(4096) == pytest.approx(1.15) and time_shift_mu(10**5) == pytest.approx(1.15)
    assert shift_time(torch.tensor([0.0, 1.0]), 0.8).tolist() == [0.0, 1.0]


def test_uniform_share_fills_the_ends_of_the_trajectory():
    """With mu = 0.5, t < 0.1 needs u < 1 / (1 + 9 e^0.5) = 0.063: the logit-normal puts ~0.35% there,
    a uniform draw 6.3%. A share p of uniform draws gives the mixture."""
    g = torch.Generator().manual_seed(0)
    low = lambda share: (sample_times(200_000, 0.5, 0, ObjectiveConfig(t_uniform_share=share), "cpu", g)[0] < 0.1)  # noqa: E731
    assert low(0.0).float().mean() < 0.006
    assert low(1.0).float().mean() == pytest.approx(0.063, abs=0.003)
    assert low(0.5).float().mean() == pytest.approx(0.5 * 0.063 + 0.5 * 0.0035, abs=0.003)
    # a location/scale change moves the logit-normal: m = -1 puts far more mass at low t
    assert (sample_times(50_000, 0.5, 0, ObjectiveConfig(t_logit_mean=-1.0), "cpu", g)[0] < 0.1).float().mean() > 0.02
    with pytest.raises(ValueError, match="t_uniform_share"):
        ObjectiveConfig(t_uniform_share=1.5).validate()


def test_lambda():
    t = torch.tensor([0.5, 0.5, 0.9])
    s = torch.tensor([0.5, 0.0, 0.5])
    assert torch.allclose(self_eval_lambda(t, s), torch.tensor([0.0, 1.0, 8.0]))


def test_self_evaluation_direction_is_classifier_gradient():
    """Result 1 of the paper: -Delta = G(x_s, s, s, c) - G(x_s, s, s, null) points along
    grad log q(c | x_s), here with the exact posterior means of a 2-class Gaussian mixture."""
    f64 = torch.float64  # where p(c | x) saturates, both vectors are ~1e-9: float32 loses them
    means = torch.tensor([[-1.5, 0.0], [1.5, 1.0]], dtype=f64)
    gmm = GaussianMixture(means, sigma=0.6)
    g = torch.Generator().manual_seed(0)
    n = 512
    labels = torch.randint(0, 2, (n,), generator=g)
    s = 0.15 + 0.7 * torch.rand(n, generator=g, dtype=f64)
    x0 = means[labels] + 0.6 * torch.randn(n, 2, generator=g, dtype=f64)
    x_s = ((1 - s[:, None]) * x0 + s[:, None] * torch.randn(n, 2, generator=g, dtype=f64)).requires_grad_(True)
    img = x_s.view(n, 2, 1, 1)
    g_c = denoise(gmm, img, s, s, cond_for(labels))
    g_u = denoise(gmm, img, s, s, cond_for(torch.full((n,), -1)))
    minus_delta = (g_c - g_u).detach().view(n, 2)
    log_q = torch.log_softmax(gmm.log_p_class(x_s, s), dim=1)[torch.arange(n), labels]
    (grad,) = torch.autograd.grad(log_q.sum(), x_s)
    cos = torch.nn.functional.cosine_similarity(minus_delta, grad, dim=1, eps=1e-30)
    assert cos.mean() > 0.99, cos.mean()
    # and the magnitudes agree with Tweedie: grad = (1 - s) / s^2 * (-Delta)
    assert torch.allclose(grad, minus_delta * ((1 - s) / s**2)[:, None], rtol=1e-6, atol=1e-12)


def test_small_gap_share_trains_the_gaps_of_many_step_sampling():
    """At 50 steps the sampler lands 0.01-0.03 below t. U((1 - tau) t, t) puts few s there; a share of small
    gaps fills it, keeps s >= (1 - tau) t, and leaves runs without it on their old random streams."""
    def draw(**kw):
        return sample_times(100_000, 0.5, 10**6, ObjectiveConfig(**kw), "cpu", torch.Generator().manual_seed(0))

    t0, s0 = draw()
    t_off, s_off = draw(small_gap_share=0.0)
    assert torch.equal(t0, t_off) and torch.equal(s0, s_off)

    def share_below(t, s, gap=0.03):
        below = s < t
        return ((t - s)[below] <= gap).float().mean().item()

    t, s = draw(small_gap_share=0.5, small_gap_max=0.05)
    base = share_below(t0, s0)
    assert base < 0.1  # the paper's interval rarely draws a gap this small
    # Half the s < t draws come from U(0, 0.05): 60% of those are <= 0.03 (fewer where s_lower clips them).
    assert share_below(t, s) == pytest.approx(0.5 * 0.6 + 0.5 * base, abs=0.03)
    assert torch.all(s <= t) and torch.all(s >= 0)
    with pytest.raises(ValueError, match="small_gap_max"):
        ObjectiveConfig(small_gap_max=0.0).validate()
