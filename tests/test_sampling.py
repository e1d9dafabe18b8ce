"""Any-step sampler against closed-form data distributions."""

import pytest
import torch

from selfe.core.types import TextCond
from selfe.core.objective import time_shift_mu
from selfe.core.sampling import MAX_STEPS, SamplerConfig, guided_velocity, landing_time, sample, step_policy, time_grid
from tests.analytic import Gaussian, PointMass


def _conds(b, fill=1.0):
    c = TextCond(torch.full((b, 2, 3), fill), torch.ones(b, 2, dtype=torch.bool), torch.full((b, 3), fill))
    null = TextCond(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 3))
    return c, null


class Counting:
    def __init__(self, net):
        self.net, self.calls, self.rows = net, 0, 0

    def __call__(self, x, *args):
        self.calls += 1
        self.rows += x.shape[0]
        return self.net(x, *args)


@pytest.mark.parametrize("steps", [1, 2, 8, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("landing", ["next", "current", "midpoint"])
def test_point_mass_is_exact_for_any_steps(steps, eta, landing):
    x_star = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cond, null = _conds(5)
    out, nfe = sample(PointMass(x_star), noise, cond, null,
                      SamplerConfig(steps=steps, eta=eta, landing=landing, guidance=1.0))
    assert torch.allclose(out, x_star.expand_as(out), atol=1e-5)
    assert nfe == steps


def test_gaussian_one_step_returns_the_mean_and_many_steps_the_distribution():
    gauss = Gaussian(mu=0.7, sigma=0.4)
    cond, null = _conds(4000)
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    one, _ = sample(gauss, noise, cond, null, SamplerConfig(steps=1, guidance=1.0, eta=0.0, landing="next"))
    assert torch.allclose(one, torch.full_like(one, 0.7), atol=1e-5)  # E[x0 | x_1] = mu
    for eta in (0.0, 1.0):
        many, nfe = sample(gauss, noise, cond, null, SamplerConfig(steps=200, guidance=1.0, eta=eta, landing="next"),
                           generator=torch.Generator().manual_seed(3))
        assert nfe == 200
        assert many.mean().item() == pytest.approx(0.7, abs=0.02)
        assert many.std().item() == pytest.approx(0.4, rel=0.05)


def test_energy_preserving_cfg_keeps_conditional_energy_and_batches_branches():
    g = torch.Generator().manual_seed(4)

    def net(x, t, s, tokens, mask, pooled):
        return x * (1 + tokens.mean(dim=(1, 2))).view(-1, 1, 1, 1) + 0.3

    counted = Counting(net)
    x = torch.randn(3, 3, 4, 4, generator=g)
    t = torch.full((3,), 0.6)
    cond, null = _conds(3, fill=2.0)
    v = guided_velocity(counted, x, t, t, cond, null.expand(3), omega=5.0)
    v_c = net(x, t, t, cond.tokens, cond.mask, cond.pooled)
    v_u = net(x, t, t, null.expand(3).tokens, null.expand(3).mask, null.expand(3).pooled)
    assert counted.calls == 1 and counted.rows == 6  # both branches in one forward
    assert torch.allclose(v.flatten(1).norm(dim=1), v_c.flatten(1).norm(dim=1), rtol=1e-5)
    raw = v_c + 4.0 * (v_c - v_u)
    cos = torch.nn.functional.cosine_similarity(v.flatten(1), raw.flatten(1))
    assert torch.allclose(cos, torch.ones(3), atol=1e-5)  # only the length changes


@pytest.mark.parametrize("steps,guidance,expected", [(1, 5.0, 2), (4, 5.0, 8), (4, 1.0, 4), (50, 3.0, 100)])
def test_nfe_counts(steps, guidance, expected):
    counted = Counting(PointMass(torch.zeros(1, 3, 4, 4)))
    cond, null = _conds(2)
    _, nfe = sample(counted, torch.randn(2, 3, 4, 4), cond, null, SamplerConfig(steps=steps, guidance=guidance, eta=1.0, landing="next"))
    assert nfe == expected
    assert counted.rows == expected * 2  # batch of 2 images


def test_time_grid_and_validation():
    grid = time_grid(8, time_shift_mu(256))
    assert grid[0] == 1.0 and grid[-1] == 0.0 and torch.all(grid[1:] < grid[:-1])
    assert grid[4] > 0.5  # the shift spends more steps at high noise
    with pytest.raises(ValueError, match="landing"):
        SamplerConfig(landing="halfway").validate()
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0).validate()


class RecordsLanding(torch.nn.Module):
    """A network that outputs 0 and records the (t, s) pairs it was called with."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.calls = cfg, []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, s, *rest):
        self.calls.append((t.clone(), s.clone()))
        return torch.zeros_like(x) * self.w


@pytest.mark.parametrize("method, expected", [("flow_matching", "current"), ("self_e", "next")])
def test_default_landing_follows_the_training_method(method, expected):
    from selfe.config import load_config
    from selfe.generator import ImageGenerator

    cfg = load_config(overrides=[f"--objective.method={method}"])
    assert cfg.sampler.landing == "auto"
    net = RecordsLanding(cfg.model)
    gen = ImageGenerator(net, cfg)
    gen.generate(["a photo of a red circle"], steps=4, guidance=1.0)
    grid = time_grid(4, cfg.shift_mu((gen.latent_size, gen.latent_size)))
    assert len(net.calls) == 4
    for k, (t, s) in enumerate(net.calls):
        want = grid[k] if expected == "current" else grid[k + 1]
        assert torch.allclose(t, grid[k].expand_as(t)) and torch.allclose(s, want.expand_as(s))
    # An explicit policy still wins over the method's default.
    net.calls.clear()
    gen.generate(["a photo of a red circle"], steps=2, guidance=1.0, landing="midpoint")
    grid2 = time_grid(2, cfg.shift_mu((gen.latent_size, gen.latent_size)))
    _, s = net.calls[0]
    assert torch.allclose(s, ((grid2[0] + grid2[1]) / 2).expand_as(s))


def test_auto_landing_must_be_resolved_before_sampling():
    from selfe.core.sampling import resolve_landing

    assert resolve_landing("auto", "flow_matching") == "current"
    assert resolve_landing("midpoint", "flow_matching") == "midpoint"
    cond, null = _conds(1)
    with pytest.raises(ValueError, match="resolve_landing"):
        sample(PointMass(torch.zeros(1, 3, 4, 4)), torch.randn(1, 3, 4, 4), cond, null, SamplerConfig(guidance=1.0, eta=1.0))


def test_hybrid_landing_lands_next_for_few_steps_and_on_t_for_many():
    assert [step_policy("hybrid", n, 8) for n in (1, 2, 8, 9, 50)] == ["next"] * 3 + ["current"] * 2
    assert step_policy("midpoint", 50, 8) == "midpoint"
    with pytest.raises(ValueError, match="step_policy"):
        landing_time(0.5, 0.4, "hybrid")
    seen = []

    def net(x, t, s, tokens, mask, pooled):
        seen.append((t - s).max().item())
        return torch.zeros_like(x)

    cond, null = _conds(2)
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for steps, gap_zero in ((2, False), (50, True)):
        seen.clear()
        sample(net, noise, cond, null, SamplerConfig(steps=steps, guidance=1.0, eta=1.0, landing="hybrid", hybrid_max_steps=8))
        assert len(seen) == steps and all((g == 0) == gap_zero for g in seen)
    with pytest.raises(ValueError, match="hybrid_max_steps"):
        SamplerConfig(hybrid_max_steps=0).validate()


def test_per_step_eta_defaults_follow_the_method_and_yield_to_an_explicit_eta():
    from selfe.core.sampling import STEP_ETA, default_eta, resolve_sampler

    for table in STEP_ETA.values():  # rising bounds that cover every step count
        assert [most for most, _ in table] == sorted(most for most, _ in table) and table[-1][0] == MAX_STEPS
    auto = SamplerConfig(guidance=2.0)
    assert auto.eta is None
    for method, landing in (("self_e", "next"), ("flow_matching", "current")):
        for steps in (1, 2, 4, 8, 50, MAX_STEPS):
            sc = resolve_sampler(auto, method, steps)
            assert (sc.steps, sc.eta, sc.landing, sc.guidance) == (steps, default_eta(steps, method), landing, 2.0)
    assert resolve_sampler(SamplerConfig(eta=0.3, landing="midpoint"), "self_e", 50).eta == 0.3  # explicit wins
    assert auto.eta is None and auto.landing == "auto"  # resolving copies
    cond, null = _conds(1)
    with pytest.raises(ValueError, match="resolve_sampler"):
        sample(PointMass(torch.zeros(1, 3, 4, 4)), torch.randn(1, 3, 4, 4), cond, null,
               SamplerConfig(guidance=1.0, landing="next"))
