"""Self-E and flow-matching objectives (selfe-method.md section 3), as pure tensor code.

Conventions: t = 0 is data, t = 1 noise; ``x_t = (1 - t) x0 + t eps``; ``v = eps - x0``;
``G(x_t, t, s, c) = x_t - t V(x_t, t, s, c)``. Flow matching is the same code with s = t.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from selfe.core.types import TextCond


@dataclass
class ObjectiveConfig:
    """Self-E training objective. [paper] defaults unless noted [ours]."""

    method: str = "self_e"
    """"self_e" or "flow_matching" (the same loss with s = t for every sample)."""
    text_drop_prob: float = 0.1
    """Probability of replacing the prompt by the null prompt (trains the unconditional branch). [ours]"""
    p_s_equals_t: float = 0.5
    """Probability that a sample is trained in evaluation mode (s = t, plain flow matching)."""
    anneal_steps: int = 300_000
    """Steps over which tau (the width of the s-interval below t) grows linearly 0 -> tau_max."""
    tau_max: float = 1.0
    """Final tau: s ~ U((1 - tau) t, t) for samples with s < t."""
    self_eval_weight: float = 1.0
    """Multiplier on lambda(s, t); 0 gives flow matching exactly. [ours]"""
    renorm_target: bool = True
    """Energy-preserving target (rescale to ||x0|| per sample); False is the (x0 + l x_self)/(1 + l) ablation."""
    shift_base_len: int = 256
    """Token count at which the time shift mu is 0.5 (1.15 at 4096, linear between, clamped). [ours]"""
    t_max: float = 1.0 - 1e-4
    """Upper clamp on t."""
    t_logit_mean: float = 0.0
    """Location m of the logit-normal: t = shift(sigmoid(m + s z)). [paper: 0]"""
    t_logit_std: float = 1.0
    """Scale s of the logit-normal. [paper: 1]"""
    t_uniform_share: float = 0.0
    """Share of samples whose t is drawn uniformly in (0, 1) instead (then shifted): trains the ends of
    the trajectory, which the logit-normal leaves almost empty at 32x32. [ours; paper: 0]"""
    small_gap_share: float = 0.0
    """Share of the s < t samples whose gap t - s is drawn from U(0, ``small_gap_max``) instead (s still
    >= (1 - tau) t): many-step sampling lands 0.01-0.03 below t, gaps that U((1 - tau) t, t) draws ~3% of
    the time. [ours; paper: 0] Off in every preset: at the CPU budget a share of 0.25 scored 0.633 at
    50 steps against 0.611 +- 0.022 without it, and lost 0.05-0.07 at 1-4 steps (docs/results.md)."""
    small_gap_max: float = 0.05
    """Largest gap t - s of the small-gap share. [ours]"""
    fake_score: bool = False
    """Enable the late fake-score term (needs fake-prompt embeddings in the batch)."""
    aux_start_step: int = 550_000
    """Step from which the fake-score term is on (paper: 550k of 710k; from the start hurts)."""
    fake_prompt_prefix: str = "fake image "
    """c_fake = prefix + caption; the cache stores its embeddings when fake_score is on. [paper]"""
    fake_mix_k: float = 0.9
    """Delta = k (g_u - g_c) + (1 - k)(g_f - g_c) once the fake-score term is on."""
    fake_loss_weight: float = 1.0
    """Weight of L_fake. [ours]"""

    def validate(self) -> None:
        if self.method not in ("self_e", "flow_matching"):
            raise ValueError(f"objective.method must be 'self_e' or 'flow_matching', got {self.method!r}")
        for name in ("text_drop_prob", "p_s_equals_t", "tau_max", "fake_mix_k", "t_uniform_share", "small_gap_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"objective.{name} must be in [0, 1], got {v}")
        if not 0.0 < self.small_gap_max <= 1.0:
            raise ValueError(f"objective.small_gap_max must be in (0, 1], got {self.small_gap_max}")
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"objective.t_max must be in (0, 1], got {self.t_max}")
        if not self.t_logit_std > 0:
            raise ValueError(f"objective.t_logit_std must be > 0, got {self.t_logit_std}")
        if self.anneal_steps < 0 or self.aux_start_step < 0:
            raise ValueError("objective.anneal_steps and objective.aux_start_step must be >= 0")


Network = Callable[..., torch.Tensor]


def denoise(net: Network, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, c: TextCond) -> torch.Tensor:
    """G(x, t, s, c) = x - t V(x, t, s, c): the one-jump clean estimate."""
    v = net(x, t, s, c.tokens, c.mask, c.pooled)
    return x - t.view(-1, 1, 1, 1).to(x.dtype) * v


def time_shift_mu(num_tokens: int, base_len: int = 256) -> float:
    """mu linear in token count: 0.5 at ``base_len``, 1.15 at 4096, clamped outside."""
    frac = (num_tokens - base_len) / max(4096 - base_len, 1)
    return 0.5 + 0.65 * min(max(frac, 0.0), 1.0)


def shift_time(u: torch.Tensor, mu: float) -> torch.Tensor:
    """shift(u) = e^mu / (e^mu + 1/u - 1); shift(0) = 0, shift(1) = 1, pushes mass towards noise."""
    em = math.exp(mu)
    safe = u.clamp_min(1e-12)
    return torch.where(u > 0, em / (em + 1.0 / safe - 1.0), torch.zeros_like(u))


def tau_at(step: int, cfg: ObjectiveConfig) -> float:
    """tau annealed linearly 0 -> tau_max over ``anneal_steps``."""
    if cfg.anneal_steps == 0:
        return cfg.tau_max
    return cfg.tau_max * min(step / cfg.anneal_steps, 1.0)


def sample_times(
    b: int, mu: float, step: int, cfg: ObjectiveConfig, device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """t = shift(u) with u = sigmoid(m + s z), or u ~ U(0, 1) for a ``t_uniform_share`` of samples;
    s = t w.p. p_s_equals_t, else s ~ U((1 - tau) t, t) (or t - U(0, small_gap_max) for a
    ``small_gap_share``, kept >= (1 - tau) t); ``mu`` is the time shift (`time_shift_mu`).
    Returns (t, s), (B,) each."""
    z = torch.randn(b, device=device, generator=generator)
    u = torch.sigmoid(cfg.t_logit_mean + cfg.t_logit_std * z)
    if cfg.t_uniform_share > 0:
        uniform = torch.rand(b, device=device, generator=generator)
        pick = torch.rand(b, device=device, generator=generator) < cfg.t_uniform_share
        u = torch.where(pick, uniform, u)
    # The lower clamp keeps the loss's 1/t finite if a uniform draw is exactly 0.
    t = shift_time(u, mu).clamp(min=1e-4, max=cfg.t_max)
    if cfg.method == "flow_matching":
        return t, t.clone()
    tau = tau_at(step, cfg)
    u = torch.rand(b, device=device, generator=generator)
    s_lower = (1.0 - tau) * t
    s = s_lower + u * (t - s_lower)
    if cfg.small_gap_share > 0:  # extra draws only when on: runs without it keep their random streams
        gap = torch.rand(b, device=device, generator=generator) * cfg.small_gap_max
        small = torch.rand(b, device=device, generator=generator) < cfg.small_gap_share
        s = torch.where(small, torch.maximum(t - gap, s_lower), s)
    equal = torch.rand(b, device=device, generator=generator) < cfg.p_s_equals_t
    return t, torch.where(equal, t, s)


def self_eval_lambda(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """lambda(s, t) = t / (1 - t) - s / (1 - s), zero when s = t."""
    return t / (1 - t) - s / (1 - s)


def energy_preserving_target(
    x0: torch.Tensor, x_self: torch.Tensor, lam: torch.Tensor, renorm: bool = True
) -> torch.Tensor:
    """x_tgt = (x0 + l x_self) * ||x0|| / ||x0 + l x_self|| per sample (fp32); without renorm
    (x0 + l x_self) / (1 + l). lam (B,); x0, x_self (B, ...). Equals x0 where lam = 0."""
    x0f, xsf = x0.float(), x_self.float()
    lamv = lam.float().view(-1, *([1] * (x0.dim() - 1)))
    mix = x0f + lamv * xsf
    if renorm:
        n0 = x0f.flatten(1).norm(dim=1)
        nm = mix.flatten(1).norm(dim=1).clamp_min(1e-12)
        out = mix * (n0 / nm).view_as(lamv)
    else:
        out = mix / (1.0 + lamv)
    return out.to(x0.dtype)


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate."""
    stats: dict[str, torch.Tensor | float]
    """Breakdown for logging: data/self-eval term magnitudes, frac_s_lt_t, lambda_mean, tau, loss per t bin
    (NaN for a bin without rows). Detached 0-dim tensors, read once at the end of the step: a read here,
    between the forward and the backward, would make the host wait for the device."""


T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Draws:
    """The random choices of one training step: drop (B,) bool, t (B,), s (B,), eps like x0, and
    optionally eps2 like x0: the fresh noise of the self-evaluation passes, drawn for the rows with
    s < t (zeros elsewhere; row 0 holds the spare draw when no row has s < t)."""

    drop: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    eps: torch.Tensor
    eps2: torch.Tensor | None = None
    eval_rows: tuple[int, ...] | None = None
    """The rows with s < t, ascending, read once when drawn (``draw_batch``); None: not known yet."""
    eval_idx: torch.Tensor | None = None
    """``eval_rows`` on the device."""

    def rows(self, lo: int, hi: int) -> Draws:
        """The draws of rows lo..hi-1 (views; the eval rows renumbered from lo, without a device read)."""
        rows = idx = None
        if self.eval_rows is not None:
            a, b = bisect.bisect_left(self.eval_rows, lo), bisect.bisect_left(self.eval_rows, hi)
            rows, idx = tuple(r - lo for r in self.eval_rows[a:b]), self.eval_idx[a:b] - lo
        return Draws(self.drop[lo:hi], self.t[lo:hi], self.s[lo:hi], self.eps[lo:hi],
                     None if self.eps2 is None else self.eps2[lo:hi], rows, idx)


@dataclass
class _StepInputs:
    """One call's inputs, shared by the loss and the self-evaluation target."""

    model: nn.Module
    ema: nn.Module
    x0: torch.Tensor
    cond: TextCond
    """Per-sample conditions after text dropout."""
    null_b: TextCond
    """The null condition broadcast to the batch."""
    fake_cond: TextCond | None
    draws: Draws
    step: int
    generator: torch.Generator | None


class SelfEObjective:
    """Computes the Self-E (or flow-matching) loss for one batch.

    ``model`` is the online network (possibly FSDP-wrapped); ``ema`` the EMA network used for the
    conditional evaluation branch. Both are called the same number of times on every rank whatever
    the batch holds, so sharded collectives never deadlock.
    """

    def __init__(self, cfg: ObjectiveConfig, image_tokens: int) -> None:
        """``image_tokens``: tokens per training image (``ModelConfig.num_tokens`` of the latent shape);
        it sets the time shift mu, as the sampler's grid does at the same resolution."""
        cfg.validate()
        self.cfg = cfg
        self.mu = time_shift_mu(image_tokens, cfg.shift_base_len)

    def draw(self, x0: torch.Tensor, step: int, generator: torch.Generator | None = None) -> Draws:
        """Steps 1-3 and the noise of step 4: which prompts drop, (t, s) and eps."""
        b, device = x0.shape[0], x0.device
        drop = torch.rand(b, device=device, generator=generator) < self.cfg.text_drop_prob
        t, s = sample_times(b, self.mu, step, self.cfg, device, generator)
        eps = torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator)
        return Draws(drop, t, s, eps)

    def draw_batch(self, shape: tuple[int, ...], step: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> Draws:
        """Every random choice of one global batch of ``shape`` = (B, C, H, W), the self-evaluation
        noise included, in the order one call on the whole batch draws them (``draw``, then eps2 for
        the rows with s < t). Every worker draws the same numbers from the same generator and keeps
        its rows, so a step's randomness does not depend on how the batch is split."""
        x0 = torch.empty(shape, device=device)
        d = self.draw(x0, step, generator)
        if self.cfg.method == "self_e":
            idx = torch.nonzero(d.s < d.t).flatten()
            d.eval_rows, d.eval_idx = tuple(idx.tolist()), idx  # the step's one read before its forwards
            spare = torch.zeros(1, dtype=torch.long, device=x0.device)
            fresh = torch.randn((max(len(d.eval_rows), 1), *shape[1:]), device=device, generator=generator)
            d.eps2 = torch.zeros(shape, device=device)
            d.eps2[idx if d.eval_rows else spare] = fresh
        return d

    def __call__(
        self,
        model: nn.Module,
        ema: nn.Module,
        x0: torch.Tensor,
        cond: TextCond,
        null_cond: TextCond,
        step: int,
        fake_cond: TextCond | None = None,
        generator: torch.Generator | None = None,
        draws: Draws | None = None,
        normalizer: float | None = None,
        fake_normalizer: float | None = None,
    ) -> LossOutput:
        """x0 (B, C, H, W) clean latents; cond per-sample; null_cond (1, ...) the empty prompt.
        ``draws`` fixes the random choices (``draw_batch``'s rows, tests); by default they are drawn
        from ``generator``. The loss is sum_b loss_b / ``normalizer`` (default B: the mean), and the
        fake-score term divides by ``fake_normalizer`` (default: this batch's rows with s < t): a
        worker's micro-batch of a larger global batch passes the global counts (``train.step``)."""
        cfg = self.cfg
        b = x0.shape[0]
        if draws is None:
            draws = self.draw(x0, step, generator)
        null_b = null_cond.expand(b)
        cond = cond.where(draws.drop, null_b)  # 1. text dropout
        t, s, eps = draws.t, draws.s, draws.eps
        tv = t.view(-1, 1, 1, 1).to(x0.dtype)
        # 4. the single grad-carrying forward
        x_t = (1 - tv) * x0 + tv * eps
        v_pred = model(x_t, t, s, cond.tokens, cond.mask, cond.pooled)
        x0_hat = x_t - tv * v_pred

        lam = self_eval_lambda(t, s) * cfg.self_eval_weight
        target = x0
        stats: dict[str, torch.Tensor | float] = {}
        aux_loss = None
        selfe = cfg.method == "self_e"
        if selfe:
            inputs = _StepInputs(model, ema, x0, cond, null_b, fake_cond, draws, step, generator)
            target, aux_loss, stats = self._self_eval_target(inputs, x0_hat, lam, fake_normalizer)
        # 8. loss = mean_b w(t) mean|x0_hat - x_tgt|^2 with w = 1/t^2, computed as the equivalent
        # velocity regression V -> (x_t - x_tgt) / t, which stays well conditioned as t -> 0.
        v_target = (eps - x0) + (x0 - target) / tv
        per_sample = (v_pred.float() - v_target.float()).pow(2).flatten(1).mean(1)
        loss = per_sample.mean() if normalizer is None else per_sample.sum() / normalizer
        if aux_loss is not None:
            loss = loss + cfg.fake_loss_weight * aux_loss
            stats["loss_fake"] = aux_loss.detach()
        with torch.no_grad():
            data_term = (v_pred.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)
            shift_term = ((x0 - target).float() / tv.float()).pow(2).flatten(1).mean(1)
            stats.update(
                loss=loss.detach(),
                loss_data_term=data_term.mean(),
                loss_self_eval_term=shift_term.mean(),
                frac_s_lt_t=(s < t).float().mean(),
                lambda_mean=lam.float().mean(),
                tau=tau_at(step, cfg) if selfe else 0.0,
            )
            for lo, hi in zip(T_BINS[:-1], T_BINS[1:]):
                in_bin = ((t >= lo) & (t < hi) if hi < 1.0 else (t >= lo)).float()
                # NaN (0 / 0) for an empty bin: masked, not indexed, so that no row count is read.
                stats[f"loss_t{lo:.2f}-{hi:.2f}"] = (per_sample.detach() * in_bin).sum() / in_bin.sum()
        return LossOutput(loss, stats)

    @torch.no_grad()
    def _eval_passes(self, model, ema, x_s, s, cond_sub, null_sub):
        g_c = denoise(ema, x_s, s, s, cond_sub)  # conditional branch: EMA weights
        g_u = denoise(model, x_s, s, s, null_sub)  # unconditional branch: online weights
        return g_c, g_u

    def _self_eval_target(self, st: _StepInputs, x0_hat: torch.Tensor, lam: torch.Tensor,
                          fake_normalizer: float | None = None):
        """Step 5-7: evaluate the model's own one-jump prediction and build the target.

        Only samples with s < t need the evaluation passes. To keep the number of forwards equal
        on every rank we always run them on at least one row; rows with s = t get lam = 0, so
        their target is x0 whatever the passes return.
        """
        cfg, x0, t, s = self.cfg, st.x0, st.draws.t, st.draws.s
        model, fake_cond = st.model, st.fake_cond
        if st.draws.eval_rows is None:  # drawn here, not by draw_batch: find them (a device read)
            idx = torch.nonzero(s < t).flatten()
            found = idx.numel() > 0
        else:
            idx, found = st.draws.eval_idx, len(st.draws.eval_rows) > 0
        if not found:
            idx = torch.zeros(1, dtype=torch.long, device=x0.device)
        x0_hat_sg = x0_hat.detach()[idx]
        s_sub = s[idx]
        sv = s_sub.view(-1, 1, 1, 1).to(x0.dtype)
        if st.draws.eps2 is not None:
            eps2 = st.draws.eps2[idx].to(x0.dtype)
        else:
            eps2 = torch.randn(x0_hat_sg.shape, device=x0.device, dtype=x0.dtype, generator=st.generator)
        x_s = (1 - sv) * x0_hat_sg + sv * eps2  # fresh noise [ours]
        g_c, g_u = self._eval_passes(model, st.ema, x_s, s_sub, st.cond[idx], st.null_b[idx])
        delta = g_u - g_c
        aux_loss = None
        if cfg.fake_score and st.step >= cfg.aux_start_step:
            if fake_cond is None:
                raise ValueError(
                    "objective.fake_score is on but the batch has no fake-prompt embeddings; "
                    "rebuild the cache with fake prompts or set objective.fake_score=false"
                )
            g_f = denoise(model, x_s, s_sub, s_sub, fake_cond[idx])  # carries gradient: L_fake
            valid = (s[idx] < t[idx]).float()
            per = (g_f - x0_hat_sg).float().pow(2).flatten(1).mean(1)
            aux_loss = (per * valid).sum() / (valid.sum().clamp_min(1.0) if fake_normalizer is None else fake_normalizer)
            delta = cfg.fake_mix_k * delta + (1 - cfg.fake_mix_k) * (g_f.detach() - g_c)
        x_self_full = x0.clone()
        x_self_full[idx] = x0_hat_sg - delta
        lam_eff = torch.where(s < t, lam, torch.zeros_like(lam))
        target = energy_preserving_target(x0, x_self_full, lam_eff, cfg.renorm_target)
        stats = {"delta_rms": delta.detach().float().pow(2).mean().sqrt()}
        return target, aux_loss, stats

