"""Estimators of per-domain gradient statistics and of their sampling errors (PIKE_MATH.md s.7, s.9).

Notation: a probe of domain k reads M chunk-mean gradients ghat_i = grad L_k + e_i of m samples each;
the e_i are independent with covariance C = Sigma / m. ``t = tr(C) = sigma^2 / m`` is the chunk noise
trace, ``T = tr(C^2)`` and ``A = mu^T C mu`` (mu = grad L_k) set the estimators' variances:

    Var(G-hat)         = 4 A / M + 2 T / (M (M - 1))          exact (a U-statistic)
    Var(sigma^2-hat)   = 2 m^2 T / (M - 1)                    Gaussian chunk noise
    Cov(G-hat, s^2-hat) = -2 m T / (M (M - 1))                Gaussian chunk noise

``T`` and ``A`` are not observable from one probe at useful precision, so they are modelled through the
noise *shape* ``kappa = T / t^2`` (the inverse effective dimension of the gradient noise, 1/d_eff) with
the mean seen like an average direction (``A = kappa t G``). ``kappa`` changes slowly (it describes the
model's noise geometry, not its scale) and is pooled across checks: each probe contributes the spread of
its chunk norms, ``Var(||ghat_i||^2) = 4 A + 2 T = 2 kappa t^2 (1 + 2 G / t)`` (Gaussian chunk noise).
A Monte Carlo check (tests/test_stats.py) shows intervals of +-1.96 standard errors covering G and
sigma^2 at close to 95% for noise scales 20-2000 and d_eff 40-200, with the mean aligned to the noise or not.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


def estimate_from_sums(
    sum_sq_of_sum: torch.Tensor,
    sum_of_sq: torch.Tensor,
    *,
    num_chunks: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased (G, sigma^2) per domain from ||S||^2 and Q = sum_i ||ghat_i||^2.

    Args:
        sum_sq_of_sum: (K,) squared norm of S, the sum of the M chunk-mean gradients.
        sum_of_sq: (K,) sum over chunks of the squared chunk-mean gradient norms.
        num_chunks: M, chunks per domain (at least 2).
        chunk_size: m, samples per chunk.

    Returns:
        (G, sigma2), float64 of shape (K,): G estimates ||grad L_k||^2 (squared gradient norm,
        may be negative) and sigma2 the per-sample gradient variance trace.
    """
    if num_chunks < 2:
        raise ValueError(f"need at least 2 chunks per domain for the variance, got {num_chunks}")
    sum_sq_of_sum = torch.as_tensor(sum_sq_of_sum, dtype=torch.float64)
    sum_of_sq = torch.as_tensor(sum_of_sq, dtype=torch.float64)
    grad_sq_norms = (sum_sq_of_sum - sum_of_sq) / (num_chunks * (num_chunks - 1))
    spread = sum_of_sq - sum_sq_of_sum / num_chunks  # sum_i ||ghat_i - S / M||^2
    per_sample_variances = chunk_size * spread / (num_chunks - 1)
    return grad_sq_norms, per_sample_variances


def pairwise_cosines(
    cross_sums: torch.Tensor, grad_sq_norms: torch.Tensor, *, num_chunks: int
) -> torch.Tensor:
    """Cosines between domain gradients, (K, K) float64.

    ``cross_sums[j, k]`` estimates <S_j, S_k>; for j != k the two sums come from independent
    samples, so <S_j, S_k> / M^2 is unbiased for <grad L_j, grad L_k>. Dividing by
    sqrt(G_j G_k) makes the cosine consistent (not unbiased; values may leave [-1, 1] through
    noise). Entries with G_j <= 0 or G_k <= 0 are NaN; the diagonal is 1.
    """
    cross_sums = torch.as_tensor(cross_sums, dtype=torch.float64)
    grad_norms = torch.as_tensor(grad_sq_norms, dtype=torch.float64).clamp(min=0).sqrt()
    norm_products = torch.outer(grad_norms, grad_norms)
    inner_products = cross_sums / num_chunks**2
    cosines = torch.where(norm_products > 0, inner_products / norm_products, math.nan)
    cosines.fill_diagonal_(1.0)
    return cosines


def noise_shape_evidence(
    chunk_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    grad_sq_reference: ArrayLike,
    *,
    chunk_size: int,
) -> tuple[FloatArray, FloatArray]:
    """One probe's evidence on the noise shape kappa = T / t^2, as (numerator, denominator) per domain.

    ``chunk_sq_norms`` is (K, M) (the ||ghat_i||^2); their sample variance estimates
    ``4 A + 2 T = 2 T (1 + 2 G / t)``, so ``T-hat = Var(||ghat||^2) / (2 (1 + 2 G+ / t))`` with
    ``G+ = max(grad_sq_reference, 0)``. Returned as (T-hat, t^2) so that several probes pool as a
    ratio of sums. Domains with no measurable noise (t <= 0) give (0, 0).
    """
    norms = np.asarray(chunk_sq_norms, dtype=np.float64)
    noise_trace = np.maximum(np.asarray(per_sample_variances, dtype=np.float64), 0.0) / chunk_size
    grad = np.maximum(np.asarray(grad_sq_reference, dtype=np.float64), 0.0)
    spread = norms.var(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        trace_sq = np.where(noise_trace > 0, spread / (2.0 * (1.0 + 2.0 * grad / noise_trace)), 0.0)
    return trace_sq, noise_trace**2


def estimator_variances(
    grad_sq_reference: ArrayLike,
    per_sample_variances: ArrayLike,
    noise_shape: ArrayLike,
    *,
    num_chunks: int,
    chunk_size: int,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Sampling (Var(G-hat), Var(sigma^2-hat), Cov(G-hat, sigma^2-hat)) of ONE probe, per domain.

    ``grad_sq_reference`` is the best available G (the pooled one; clamped at 0), ``per_sample_variances``
    this probe's sigma^2-hat, ``noise_shape`` the pooled kappa = 1/d_eff. Units: squared units of G and of
    sigma^2 (per-sample).
    """
    m, chunks = float(chunk_size), float(num_chunks)
    noise_trace = np.maximum(np.asarray(per_sample_variances, dtype=np.float64), 0.0) / m
    grad = np.maximum(np.asarray(grad_sq_reference, dtype=np.float64), 0.0)
    trace_sq = np.asarray(noise_shape, dtype=np.float64) * noise_trace**2  # T
    mean_term = np.asarray(noise_shape, dtype=np.float64) * noise_trace * grad  # A
    grad_var = 4.0 * mean_term / chunks + 2.0 * trace_sq / (chunks * (chunks - 1.0))
    variance_var = 2.0 * m * m * trace_sq / (chunks - 1.0)
    covariance = -2.0 * m * trace_sq / (chunks * (chunks - 1.0))
    return grad_var, variance_var, covariance


def inner_product_variances(
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    noise_shape: ArrayLike,
    inner_product_sketch_var: ArrayLike,
    *,
    num_chunks: int,
    chunk_size: int,
) -> FloatArray:
    """Sampling variance of one probe's X_jk, the unbiased estimate of <grad L_j, grad L_k>, (K, K).

    X_jk is the inner product of two domains' means of M chunks each, from independent samples. With the
    noise model above (chunk noise trace t = sigma^2 / m, shape kappa, ``grad_sq_norms`` the pooled G's,
    clamped at 0), ``Var(X) = (G_j kappa_k t_k + G_k kappa_j t_j) / M + sqrt(kappa_j kappa_k) t_j t_k / M^2``
    plus ``inner_product_sketch_var``, what the gradient sketch adds. The diagonal is not an inner product
    estimate (G-hat has its own variance, :func:`estimator_variances`).
    """
    positive = np.maximum(np.asarray(grad_sq_norms, dtype=np.float64), 0.0)
    noise_trace = np.maximum(np.asarray(per_sample_variances, dtype=np.float64), 0.0) / chunk_size
    shape = np.asarray(noise_shape, dtype=np.float64)
    chunks = float(num_chunks)
    mean_noise = np.outer(positive, shape * noise_trace)  # G_j kappa_k t_k
    return ((mean_noise + mean_noise.T) / chunks
            + np.sqrt(np.outer(shape, shape)) * np.outer(noise_trace, noise_trace) / chunks**2
            + np.asarray(inner_product_sketch_var, dtype=np.float64))


def cosine_intervals(
    inner_products: ArrayLike,
    inner_product_sketch_var: ArrayLike,
    grad_sq_norms: ArrayLike,
    grad_sq_var: ArrayLike,
    per_sample_variances: ArrayLike,
    noise_shape: ArrayLike,
    *,
    num_chunks: int,
    chunk_size: int,
) -> tuple[FloatArray, FloatArray]:
    """Cosines between domain gradients and their standard errors, (K, K) each (diagonal 1 and 0).

    ``inner_products[j, k]`` is one probe's unbiased estimate X of <grad L_j, grad L_k>, with variance
    from :func:`inner_product_variances`. The cosine divides X by sqrt(G_j G_k) (``grad_sq_norms``,
    pooled, with variances ``grad_sq_var``); its standard error adds the two relative errors of the
    denominator (delta method). NaN where a G <= 0.
    """
    cross = np.asarray(inner_products, dtype=np.float64)
    positive = np.maximum(np.asarray(grad_sq_norms, dtype=np.float64), 0.0)
    cross_var = inner_product_variances(grad_sq_norms, per_sample_variances, noise_shape, inner_product_sketch_var,
                                        num_chunks=num_chunks, chunk_size=chunk_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_products = np.sqrt(np.outer(positive, positive))
        cosines = np.where(norm_products > 0, cross / norm_products, np.nan)
        relative_grad_var = np.asarray(grad_sq_var, dtype=np.float64) / (4.0 * positive**2)
        se = np.sqrt(cross_var / norm_products**2
                     + cosines**2 * np.add.outer(relative_grad_var, relative_grad_var))
    se = np.where(norm_products > 0, se, np.nan)
    np.fill_diagonal(cosines, 1.0)
    np.fill_diagonal(se, 0.0)
    return cosines, se
