"""Algorithm 1 (s.5, s.6): ``log w_k += clip(zeta1*y_k*G_k - zeta2*sigma2_k/(2b))``, with ``y = 1`` for
PiKE and ``y = K*softmax(tau*L_k)`` for Balanced-PiKE; and the full mirror-descent score (s.5) for
checking the ``gamma = 0`` reduction to Algorithm 1.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from composer_pike.weights._checks import (FloatArray, _active_mask, _non_finite_reason, _non_negative, _positive,
                                           _require_finite, _same_shape, _statistics, _vector)
from composer_pike.weights.conceptual import descent_bound_coefficients
from composer_pike.weights.steps import PikeStep, apply_scores, default_min_weight


def pike_scores(
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    *,
    zeta1: float,
    zeta2: float,
    batch_size: float,
    loss_weights: ArrayLike | None = None,
) -> FloatArray:
    """Per-domain log-weight increment ``zeta1*y_k*G_k - zeta2*sigma2_k/(2b)`` (s.5, s.6).

    ``y = loss_weights`` (Balanced-PiKE coefficients) or 1; raw, possibly negative, estimates
    are used as is (s.7). Units: nats of log-weight per check.
    """
    grad, variance = _statistics(grad_sq_norms, per_sample_variances)
    zeta1 = _non_negative("zeta1", zeta1)
    zeta2 = _non_negative("zeta2", zeta2)
    batch_size = _positive("batch_size", batch_size)
    if loss_weights is not None:
        coefficients = _vector("loss_weights", loss_weights)
        _same_shape("grad_sq_norms", grad, loss_weights=coefficients)
        grad = coefficients * grad
    return zeta1 * grad - zeta2 * variance / (2.0 * batch_size)


def mirror_descent_scores(
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    weights: ArrayLike,
    *,
    step_size: float,
    lr: float,
    batch_size: float,
    smoothness: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> FloatArray:
    """Exponent of one entropic mirror-descent step on the s.3 bound (s.5 full form):
    ``alpha*eta*(beta - L*eta*gamma*w_k)*G_k - alpha*L*eta^2*sigma2_k/(2b)``, ``alpha = step_size``.

    Equals ``-step_size * (lambda_k + kappa_k*w_k)``, i.e. minus the step size times the bound's
    gradient; with ``gamma = 0`` it is :func:`pike_scores` at ``zeta1 = alpha*eta*beta``,
    ``zeta2 = alpha*L*eta^2``.
    """
    linear, quadratic = descent_bound_coefficients(
        grad_sq_norms,
        per_sample_variances,
        lr=lr,
        batch_size=batch_size,
        smoothness=smoothness,
        beta=beta,
        gamma=gamma,
    )
    current = _vector("weights", weights)
    _same_shape("grad_sq_norms", linear, weights=current)
    return -_positive("step_size", step_size) * (linear + quadratic * current)


def balanced_coefficients(
    domain_losses: ArrayLike, tau: float, *, active: ArrayLike | None = None
) -> FloatArray:
    """Balanced-PiKE loss weights ``yhat = K * softmax(tau * L)`` over active domains (s.6).

    Mean 1 over the ``K`` active domains (0 on inactive ones); ``tau = 0`` gives exactly 1
    (plain PiKE), large ``tau`` concentrates on the highest loss. Max-subtraction keeps it
    finite for any finite losses. Raises ValueError for ``tau < 0`` or a non-finite loss.
    """
    losses = _vector("domain_losses", domain_losses)
    tau = _non_negative("tau", tau)
    mask = _active_mask(active, losses.size)
    active_losses = losses[mask]
    _require_finite("domain_losses", np.where(mask, losses, 0.0))
    tilted = np.exp(tau * (active_losses - active_losses.max()))
    coefficients = np.zeros(losses.size)
    coefficients[mask] = active_losses.size * tilted / tilted.sum()
    return coefficients


def pike_update(
    log_weights: ArrayLike,
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    *,
    zeta1: float,
    zeta2: float,
    batch_size: float,
    loss_weights: ArrayLike | None = None,
    active: ArrayLike | None = None,
    score_clip: float = 1.0,
    min_weight: ArrayLike | None = None,
    max_weight: ArrayLike = 1.0,
) -> PikeStep:
    """One PiKE check in log space (Algorithm 1, s.5; numerics s.8).

    ``log w += clip(pike_scores, +-score_clip)`` through :func:`apply_scores` (``min_weight`` defaults
    to :func:`default_min_weight`). The update is multiplicative and cumulative.

    A non-finite statistic on an active domain, or all-zero statistics, skips the update
    (scores 0, ``skipped=True``, ``reason`` set); the weights are then only renormalised and
    projected, which leaves weights that already satisfy the bounds unchanged.
    """
    current = _vector("log_weights", log_weights)
    grad, variance = _statistics(grad_sq_norms, per_sample_variances)
    _same_shape("log_weights", current, grad_sq_norms=grad)
    num_domains = current.size
    mask = _active_mask(active, num_domains)
    coefficients = None if loss_weights is None else _vector("loss_weights", loss_weights)
    if coefficients is not None:
        _same_shape("log_weights", current, loss_weights=coefficients)

    with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs are reported below
        raw = pike_scores(
            np.where(mask, grad, 0.0),
            np.where(mask, variance, 0.0),
            zeta1=zeta1,
            zeta2=zeta2,
            batch_size=batch_size,
            loss_weights=None if coefficients is None else np.where(mask, coefficients, 0.0),
        )
    reason = _skip_reason(grad, variance, coefficients, raw, mask)
    if min_weight is None:
        min_weight = default_min_weight(int(np.count_nonzero(mask)), batch_size)
    return apply_scores(current, np.zeros(num_domains) if reason else raw, active=mask, score_clip=score_clip,
                        min_weight=min_weight, max_weight=max_weight, reason=reason)


def _skip_reason(
    grad: FloatArray,
    variance: FloatArray,
    coefficients: FloatArray | None,
    raw_scores: FloatArray,
    mask: NDArray[np.bool_],
) -> str:
    """Why this check's statistics cannot drive an update ("" when they can)."""
    statistics = {"grad_sq_norms": grad, "per_sample_variances": variance}
    if coefficients is not None:
        statistics["loss_weights"] = coefficients
    statistics["scores (overflow)"] = raw_scores
    reason = _non_finite_reason(mask, statistics)
    if reason:
        return reason
    if not (grad[mask].any() or variance[mask].any()):
        return "all gradient statistics are zero on the active domains"
    return ""
