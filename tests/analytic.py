"""Closed-form denoisers used as stand-in networks in the math tests.

A "net" here has the model's signature ``net(x, t, s, tokens, mask, pooled) -> V`` and returns
V = (x - E[x0 | x_t = x, c]) / t, so that G = x - t V is the exact posterior mean.
"""

from __future__ import annotations

import torch

from selfe.core.types import TextCond


def cond_for(labels: torch.Tensor, n_classes: int = 2) -> TextCond:
    """Encode class labels (B,) as one-token conditions; label -1 is the null prompt."""
    b = labels.shape[0]
    tokens = torch.zeros(b, 1, n_classes + 1)
    tokens[torch.arange(b), 0, labels.clamp(min=-1) % (n_classes + 1)] = 1.0
    return TextCond(tokens, torch.ones(b, 1, dtype=torch.bool), tokens[:, 0].clone())


class PointMass:
    """Data is always x_star: E[x0 | x_t] = x_star."""

    def __init__(self, x_star: torch.Tensor) -> None:
        self.x_star = x_star

    def __call__(self, x, t, s, tokens, mask, pooled):
        return (x - self.x_star) / t.view(-1, 1, 1, 1)


class Gaussian:
    """x0 ~ N(mu, sigma^2 I): E[x0 | x_t] = mu + (1-t) sigma^2 / ((1-t)^2 sigma^2 + t^2) (x_t - (1-t) mu)."""

    def __init__(self, mu: float, sigma: float) -> None:
        self.mu, self.sigma = mu, sigma

    def posterior_mean(self, x, t):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        var = (1 - t) ** 2 * self.sigma**2 + t**2
        return self.mu + (1 - t) * self.sigma**2 / var * (x - (1 - t) * self.mu)

    def __call__(self, x, t, s, tokens, mask, pooled):
        return (x - self.posterior_mean(x, t)) / t.view(-1, 1, 1, 1)


class GaussianMixture:
    """Two equiprobable classes x0 | c ~ N(m_c, sigma^2 I) in 2-D (stored as (B, 2, 1, 1) images).

    Token one-hot index c in {0, 1} selects the class; index 2 (label -1) is the null prompt,
    for which the posterior mean is the unconditional one.
    """

    def __init__(self, means: torch.Tensor, sigma: float) -> None:
        self.means, self.sigma = means, sigma  # (2, 2)

    def log_p_class(self, x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p(x_t | c) for each class: (B, 2) from x2 (B, 2)."""
        tt = t.view(-1, 1)
        var = (1 - tt) ** 2 * self.sigma**2 + tt**2
        diff = x2[:, None, :] - (1 - tt[:, :, None]) * self.means[None]
        return -0.5 * (diff**2).sum(-1) / var - torch.log(var)  # 2-D: log det = 2 * 0.5 log var

    def class_means(self, x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t, c] for both classes: (B, 2, 2)."""
        tt = t.view(-1, 1, 1)
        var = (1 - tt) ** 2 * self.sigma**2 + tt**2
        return self.means[None] + (1 - tt) * self.sigma**2 / var * (x2[:, None, :] - (1 - tt) * self.means[None])

    def __call__(self, x, t, s, tokens, mask, pooled):
        x2 = x.flatten(1)
        cm = self.class_means(x2, t)
        post = torch.softmax(self.log_p_class(x2, t), dim=1)  # p(c | x_t)
        uncond = (post[:, :, None] * cm).sum(1)
        label = tokens[:, 0].argmax(-1)
        cond = cm[torch.arange(x.shape[0]), label.clamp(max=1)]
        mean = torch.where((label == 2)[:, None], uncond, cond)
        return (x2 - mean).view_as(x) / t.view(-1, 1, 1, 1)
