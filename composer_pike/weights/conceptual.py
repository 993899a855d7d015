"""Conceptual PiKE (PIKE_MATH.md s.3, s.4): the one-step descent bound's coefficients
``lambda_k = -eta*beta*G_k + L*eta^2*sigma2_k/(2b)``, ``kappa_k = L*eta^2*gamma*G_k``, its exact
minimiser over the simplex, ``sum_k w_k*lambda_k + kappa_k*w_k^2/2``, by a sorted-threshold solve, and
one check of conceptual PiKE (that minimiser projected onto the floor and cap, :func:`kkt_update`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from composer_pike.weights._checks import (FloatArray, _active_mask, _non_negative, _per_domain, _positive,
                                           _require_finite, _statistics, _vector)
from composer_pike.weights.steps import PikeStep, apply_scores, project_to_bounds


def descent_bound_coefficients(
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    *,
    lr: float,
    batch_size: float,
    smoothness: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> tuple[FloatArray, FloatArray]:
    """Linear and quadratic coefficients ``(lambda, kappa)`` of the one-step bound (s.3).

    ``lambda_k = -lr*beta*G_k + smoothness*lr^2*sigma2_k/(2*batch_size)`` and
    ``kappa_k = smoothness*lr^2*gamma*G_k``, so the bound's change in loss is
    ``sum_k w_k*lambda_k + kappa_k*w_k^2/2`` for mixture weights ``w`` (``batch_size`` in samples).
    """
    grad, variance = _statistics(grad_sq_norms, per_sample_variances)
    lr = _positive("lr", lr)
    batch_size = _positive("batch_size", batch_size)
    smoothness = _non_negative("smoothness", smoothness)
    gamma = _non_negative("gamma", gamma)
    if not np.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta!r}")
    linear = -lr * beta * grad + smoothness * lr**2 * variance / (2.0 * batch_size)
    quadratic = smoothness * lr**2 * gamma * grad
    return linear, quadratic


def kkt_weights(
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    *,
    lr: float,
    batch_size: float,
    smoothness: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    previous: ArrayLike | None = None,
    active: ArrayLike | None = None,
) -> FloatArray:
    """Exact minimiser over the simplex of the s.3 descent bound (conceptual PiKE).

    KKT gives ``w_k = max(0, (t_k - mu)/kappa_k)`` with ``t_k = -lambda_k``; sorting ``t``
    descending, the support is the longest prefix whose threshold
    ``h_m = sum_{j<=m} (t_j - t_m)/kappa_j`` stays below 1, and then
    ``mu = (sum_S t/kappa - 1) / sum_S 1/kappa``. O(K log K).

    Statistics are clamped at 0 (estimates can be negative); domains with ``G_k <= 0`` or
    inactive domains get weight 0. If no active domain has ``G_k > 0`` the bound carries no
    signal: ``previous`` (restricted to active domains, renormalised) or uniform is returned.
    """
    grad, variance = _statistics(grad_sq_norms, per_sample_variances)
    num_domains = grad.size
    mask = _active_mask(active, num_domains)
    _require_finite("grad_sq_norms", grad[mask])
    _require_finite("per_sample_variances", variance[mask])
    if not (smoothness > 0 and gamma > 0):
        raise ValueError(
            f"kkt_weights needs a strictly convex bound: smoothness and gamma must be > 0, "
            f"got smoothness={smoothness!r}, gamma={gamma!r}"
        )
    linear, quadratic = descent_bound_coefficients(
        np.where(mask, np.maximum(grad, 0.0), 0.0),
        np.where(mask, np.maximum(variance, 0.0), 0.0),
        lr=lr,
        batch_size=batch_size,
        smoothness=smoothness,
        beta=beta,
        gamma=gamma,
    )
    support = mask & (grad > 0)
    if not support.any():
        return _fallback_weights(previous, mask)

    target = -linear[support]
    inverse_curvature = 1.0 / quadratic[support]
    order = np.argsort(-target, kind="stable")
    sorted_target = target[order]
    cum_inverse = np.cumsum(inverse_curvature[order])
    cum_weighted_target = np.cumsum(sorted_target * inverse_curvature[order])
    threshold = cum_weighted_target - sorted_target * cum_inverse
    support_size = np.flatnonzero(threshold < 1.0)[-1] + 1  # h_1 = 0, so never empty
    multiplier = (cum_weighted_target[support_size - 1] - 1.0) / cum_inverse[support_size - 1]
    weights = np.zeros(num_domains)
    weights[support] = np.maximum(0.0, (target - multiplier) * inverse_curvature)
    return weights


def kkt_update(
    log_weights: ArrayLike,
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    *,
    lr: float,
    batch_size: float,
    smoothness: float,
    beta: float = 1.0,
    gamma: float = 1.0,
    active: ArrayLike | None = None,
    min_weight: ArrayLike,
    max_weight: ArrayLike = 1.0,
) -> PikeStep:
    """One check of conceptual PiKE: :func:`kkt_weights` at learning rate ``lr``, projected onto
    ``[min(min_weight, max_weight), max_weight]``.

    Unlike Algorithm 1 the result does not depend on the current weights (except as the fallback when
    no active domain has ``G_k > 0``); ``scores`` holds the change of log-weight. A learning rate or
    smoothness that is not positive (warmup from 0, a bound with no curvature) skips the check: the
    current weights, renormalised and projected.
    """
    current = _vector("log_weights", log_weights)
    mask = _active_mask(active, current.size)
    reason = (f"no step at learning rate {lr}" if not lr > 0
              else "no positive gradient to follow (smoothness 0)" if not smoothness > 0 else "")
    if reason:
        return apply_scores(current, np.zeros(current.size), active=mask, min_weight=min_weight,
                            max_weight=max_weight, reason=reason)
    with np.errstate(divide="ignore"):
        weights = np.where(mask, np.exp(current), 0.0)
    optimum = kkt_weights(grad_sq_norms, per_sample_variances, lr=lr, batch_size=batch_size, smoothness=smoothness,
                          beta=beta, gamma=gamma, previous=weights, active=mask)
    cap = _per_domain("max_weight", max_weight, current.size)
    floor = np.minimum(_per_domain("min_weight", min_weight, current.size), cap)
    projected = project_to_bounds(optimum, floor, cap, active=mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        new_log_weights = np.where(mask, np.log(projected), -np.inf)
        change = np.where(mask, new_log_weights - current, 0.0)
    return PikeStep(new_log_weights, projected, change, False, "")


def _fallback_weights(previous: ArrayLike | None, mask: NDArray[np.bool_]) -> FloatArray:
    """``previous`` restricted to active domains and renormalised, or uniform over them."""
    if previous is not None:
        given = _vector("previous", previous)
        if given.shape != mask.shape:
            raise ValueError(f"previous has shape {given.shape} but there are {mask.size} domains")
        kept = np.where(mask, given, 0.0)
        _require_finite("previous", kept)
        if (kept < 0).any():
            raise ValueError("previous must be non-negative")
        total = kept.sum()
        if total > 0:
            return kept / total
    return mask / np.count_nonzero(mask)
