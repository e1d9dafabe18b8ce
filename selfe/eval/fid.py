"""Fréchet Inception Distance: the Gaussian statistics of image features and the distance between two.

With features X1 (N1, D) and X2 (N2, D) of two image sets, each set is summarised by its mean
mu (D,) and unbiased covariance S (D, D), and

    FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

The square-root term is computed without a general matrix square root (pytorch-fid's ``sqrtm`` can
return complex values and needs an ``eps`` fix for singular covariances): with A = S1^{1/2} (the
symmetric PSD root, from ``eigh``), S1 S2 = A (A S2 A) A^{-1} is similar to the symmetric PSD matrix
A S2 A, so Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(A S2 A)), with tiny negative eigenvalues from
rounding clipped to 0. This works when N < D (rank-deficient covariances, the periodic in-training
score); such small-sample FIDs are biased upwards and only comparable at equal N.

Which network gives the features is ``selfe.eval.feature_nets``; this module is NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64, and the number of samples N."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """features (N, D) -> mean (D,) and unbiased covariance (D, D) in float64. Needs N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"FID needs features of shape (N >= 2, D), got {x.shape}; score at least 2 images")
    if not np.isfinite(x).all():
        raise ValueError("FID features contain NaN or inf: the feature network or the images are broken")
    return GaussianStats(x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), x.shape[0])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric PSD matrix (D, D); rounding negatives -> 0."""
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) = sum sqrt(eig(A S2 A)) with A = S1^{1/2}; S1, S2 (D, D) symmetric PSD."""
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) of two Gaussians (mu (D,), sigma (D, D)).

    Symmetric in (a, b), >= 0 up to rounding (clipped at 0), and 0 for equal statistics.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature widths differ ({a.mu.shape[0]} vs {b.mu.shape[0]}): "
                         "both sets must come from the same feature network")
    mean_term = float(((a.mu - b.mu) ** 2).sum())
    cov_term = float(np.trace(a.sigma) + np.trace(b.sigma)) - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
    return max(mean_term + cov_term, 0.0)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(gaussian_stats(features1), gaussian_stats(features2))
