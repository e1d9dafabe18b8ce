"""Any-step sampling (selfe-method.md section 4): shifted time grid, landing-time policy,
energy-preserving CFG and the DDIM-eta update on the rectified-flow path."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from selfe.core.objective import Network, shift_time
from selfe.core.types import TextCond

LANDING_POLICIES = ("next", "current", "midpoint", "hybrid")
AUTO = "auto"


MAX_STEPS = 1000
"""The most sampling steps any entry point accepts."""


@dataclass
class SamplerConfig:
    """Inference settings."""

    steps: int = 4
    """Number of steps N (1..1000); each costs one network evaluation per guidance branch."""
    guidance: float = 5.0
    """CFG scale omega; 1 disables guidance (one NFE per step)."""
    eta: float | None = None
    """DDIM eta: 0 deterministic Euler, 1 the paper's stochastic sampler; None (the default): the
    measured per-step default of the model's training method (``STEP_ETA``, ``resolve_sampler``)."""
    landing: str = AUTO
    """Landing time s: "next" (t_{k+1}), "current" (t_k: flow matching), "midpoint", "hybrid" ("next" up
    to ``hybrid_max_steps`` steps, "current" above: at 50 steps the gaps t - s are 0.01-0.03, which
    training rarely draws), or "auto": follow the training method (``resolve_landing``), so a
    flow-matching model is never fed gaps it never saw. "auto" is the default of every preset: over
    three CPU-budget seeds no other policy beat "next" at any step count, "current" included at 50
    steps (0.594 +- 0.019 against 0.611 +- 0.022; docs/results.md)."""
    hybrid_max_steps: int = 8
    """With landing "hybrid": the most steps that still land on the next grid time. [ours]"""

    def validate(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"sampler.steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if self.landing not in (*LANDING_POLICIES, AUTO):
            raise ValueError(f"sampler.landing must be one of {(*LANDING_POLICIES, AUTO)}, got {self.landing!r}")
        if self.hybrid_max_steps < 1:
            raise ValueError(f"sampler.hybrid_max_steps must be >= 1, got {self.hybrid_max_steps}")
        if (self.eta is not None and self.eta < 0) or self.guidance < 0:
            raise ValueError("sampler.eta and sampler.guidance must be >= 0")


def time_grid(steps: int, mu: float = 0.5, device=None) -> torch.Tensor:
    """t_k = shift_mu(linspace(1, 0, N + 1)), k = 0..N: (N + 1,), from 1 (noise) to 0 (data). ``mu`` is
    the training time shift (`time_shift_mu` of the image token count; 0.5 up to ``shift_base_len``)."""
    u = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift_time(u, mu)


def resolve_landing(landing: str, method: str) -> str:
    """The policy "auto" stands for: "current" (s = t) for a flow-matching network, which has only
    seen s = t, and "next" [paper] for a Self-E network. Explicit policies pass through."""
    if landing != AUTO:
        return landing
    return "current" if method == "flow_matching" else "next"


STEP_ETA: dict[str, tuple[tuple[int, float], ...]] = {
    "self_e": ((MAX_STEPS, 0.5),),
    "flow_matching": ((2, 0.0), (MAX_STEPS, 1.0)),
}
"""Per training method, ((most steps, eta), ...) in rising order: the first row whose bound is at least
the step count gives the default eta. Chosen on the development prompt set (``dev``, noise seeds 4321
and 4322; docs/recipe.md, "Per-step sampler defaults") with the reproduction study's models: per method
the eta of {0, 0.5, 1} with the best mean over 2-50 steps, a step count getting its own row only where
another eta beats it there by more than the standard error of the difference. Self-E: eta = 0.5 at
every step count; flow matching: deterministic (eta = 0) up to 2 steps, eta = 1 above."""


def default_eta(steps: int, method: str) -> float:
    """The per-step default eta of a model trained with ``method`` (``STEP_ETA``)."""
    table = STEP_ETA["flow_matching" if method == "flow_matching" else "self_e"]
    return next(eta for most, eta in table if steps <= most)


def resolve_sampler(cfg: SamplerConfig, method: str, steps: int | None = None) -> SamplerConfig:
    """A copy of ``cfg`` at ``steps`` (default: cfg.steps) with every automatic setting made concrete for
    a model trained with ``method``: landing "auto" (``resolve_landing``) and eta None (``default_eta``).
    What ``sample`` needs; explicit settings pass through."""
    out = replace(cfg, steps=steps or cfg.steps)
    out.landing = resolve_landing(out.landing, method)
    if out.eta is None:
        out.eta = default_eta(out.steps, method)
    return out


def step_policy(policy: str, steps: int, hybrid_max_steps: int) -> str:
    """The per-step policy a whole-run policy stands for at ``steps`` steps: "hybrid" is "next" up to
    ``hybrid_max_steps`` steps and "current" above; the others pass through."""
    if policy == "hybrid":
        return "next" if steps <= hybrid_max_steps else "current"
    return policy


def landing_time(t: float, t_next: float, policy: str) -> float:
    if policy == "next":
        return t_next
    if policy == "current":
        return t
    if policy == "midpoint":
        return 0.5 * (t + t_next)
    if policy == AUTO:
        raise ValueError('landing "auto" must be resolved for the model first: resolve_landing(landing, method)')
    if policy == "hybrid":
        raise ValueError('landing "hybrid" depends on the step count: step_policy(policy, steps, hybrid_max_steps)')
    raise ValueError(f"unknown landing policy {policy!r}; use one of {LANDING_POLICIES}")


def guided_velocity(
    net: Network, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: TextCond, null: TextCond, omega: float
) -> torch.Tensor:
    """Energy-preserving CFG: v = v_c + (omega - 1)(v_c - v_u), rescaled per sample to ||v_c||.
    Both branches run in one batched forward. x (B, C, H, W) -> v (B, C, H, W)."""
    if omega == 1.0:
        return net(x, t, s, cond.tokens, cond.mask, cond.pooled)
    both = cond.cat(null)
    v = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), both.tokens, both.mask, both.pooled)
    v_c, v_u = v.chunk(2)
    guided = v_c + (omega - 1.0) * (v_c - v_u)
    norm_c = v_c.float().flatten(1).norm(dim=1)
    norm_g = guided.float().flatten(1).norm(dim=1).clamp_min(1e-12)
    return guided * (norm_c / norm_g).view(-1, 1, 1, 1).to(guided.dtype)


Generators = torch.Generator | list[torch.Generator] | None


def randn_rows(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; a list of generators draws row i from generator i,
    so an image's noise does not depend on which batch it is sampled in."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device) for g in generator]).to(x.device)
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


def ddim_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, eta: float, generator: Generators) -> torch.Tensor:
    """One move from t to t' on x_t = (1 - t) x0 + t eps.

    x0_hat = x - t v, eps_hat = x + (1 - t) v, sigma = max(t' - eta (t - t') t' / t, 0),
    x' = (1 - t') x0_hat + sigma eps_hat + sqrt(t'^2 - sigma^2) z. Returns x0_hat when t' = 0.
    """
    x0_hat = x - t * v
    if t_next <= 0.0:
        return x0_hat
    eps_hat = x + (1.0 - t) * v
    sigma = max(t_next - eta * (t - t_next) * t_next / t, 0.0)
    out = (1.0 - t_next) * x0_hat + sigma * eps_hat
    fresh = max(t_next**2 - sigma**2, 0.0) ** 0.5
    if fresh > 0:
        out = out + fresh * randn_rows(x, generator)
    return out


@torch.no_grad()
def sample(
    net: Network,
    noise: torch.Tensor,
    cond: TextCond,
    null_cond: TextCond,
    cfg: SamplerConfig,
    shift_mu: float = 0.5,
    generator: Generators = None,
) -> tuple[torch.Tensor, int]:
    """Generate x0 from ``noise`` (B, C, H, W) in ``cfg.steps`` steps on the grid shifted by ``shift_mu``
    (the training shift: ``Config.shift_mu``).

    ``null_cond`` is the empty prompt, (1, ...) or (B, ...). Returns (x0 (B, C, H, W), NFE), where NFE
    counts network evaluations per image: steps, times two with guidance.
    """
    cfg.validate()
    if cfg.eta is None:
        raise ValueError("sampler.eta None (the per-step default) must be resolved for the model first: "
                         "resolve_sampler(cfg, method)")
    b = noise.shape[0]
    null = null_cond.expand(b) if null_cond.tokens.shape[0] == 1 and b > 1 else null_cond
    grid = time_grid(cfg.steps, shift_mu).tolist()
    policy = step_policy(cfg.landing, cfg.steps, cfg.hybrid_max_steps)
    x = noise
    nfe = 0
    for t, t_next in zip(grid[:-1], grid[1:]):
        s = landing_time(t, t_next, policy)
        tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
        ss = torch.full((b,), s, device=x.device, dtype=torch.float32)
        v = guided_velocity(net, x, tt, ss, cond, null, cfg.guidance)
        nfe += 1 if cfg.guidance == 1.0 else 2
        x = ddim_step(x, v, t, t_next, cfg.eta, generator)
    return x, nfe
