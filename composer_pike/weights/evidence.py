"""The evidence-driven update (s.9, PiKE's default): Algorithm 1's scores relative to the mixture's
(badly measured domains discounted), shrunk by their standard errors, in units of the domains'
gradient signal, with ``zeta2/zeta1`` from the noise scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from composer_pike.weights._checks import (FloatArray, _active_mask, _non_finite_reason, _non_negative, _positive,
                                           _same_shape, _statistics, _vector)


def auto_zeta_ratio(
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    weights: ArrayLike,
    *,
    batch_size: float,
) -> float:
    """``zeta2/zeta1 = b / (b + B)``, B = sum_k w_k sigma_k^2 / sum_k w_k G_k the mixture's noise scale.

    In the mirror-descent form zeta2/zeta1 = L eta / beta (s.5). A learning rate tuned near the
    large-batch optimum of McCandlish et al. (2018) satisfies ``L eta ~ 1 / (1 + B/b)``: so, with
    beta = 1, a domain's score changes sign at noise scale ``2 (b + B)``, twice the batch plus the
    mixture's own noise scale, instead of the fixed ``2b`` of zeta_ratio = 1. Statistics are clamped at 0;
    with no positive G the ratio is 0 (nothing to trade the variance against).
    """
    grad, variance = _statistics(grad_sq_norms, per_sample_variances)
    mix = _vector("weights", weights)
    _same_shape("grad_sq_norms", grad, weights=mix)
    batch_size = _positive("batch_size", batch_size)
    signal = batch_size * float(np.sum(mix * np.maximum(grad, 0.0)))
    noise = float(np.sum(mix * np.maximum(variance, 0.0)))
    return signal / (signal + noise) if signal > 0 else 0.0


def alignment_terms(inner_products: ArrayLike, inner_product_var: ArrayLike | None, coefficients: FloatArray,
                    mask: NDArray[np.bool_]) -> tuple[FloatArray, FloatArray]:
    """Per domain k, ``sum_{j != k} y_j X_jk`` and ``sum_{j != k} y_j^2 Var X_jk`` over the active domains j
    (0 off ``mask``): what the other domains' losses gain per unit of k's weight, in units of G."""
    num_domains = coefficients.size
    cross = np.asarray(inner_products, dtype=np.float64)
    if inner_product_var is None:
        raise ValueError("inner_products needs inner_product_var")
    cross_var = np.asarray(inner_product_var, dtype=np.float64)
    for name, value in (("inner_products", cross), ("inner_product_var", cross_var)):
        if value.shape != (num_domains, num_domains):
            raise ValueError(f"{name} must have shape ({num_domains}, {num_domains}), got {value.shape}")
    pairs = np.outer(mask, mask) & ~np.eye(num_domains, dtype=bool)
    if not np.isfinite(np.where(pairs, cross, 0.0)).all() or not np.isfinite(np.where(pairs, cross_var, 0.0)).all():
        raise ValueError("inner_products and inner_product_var must be finite between active domains")
    cross, cross_var = np.where(pairs, cross, 0.0), np.where(pairs, np.maximum(cross_var, 0.0), 0.0)
    return cross @ coefficients, cross_var @ coefficients**2


@dataclass(frozen=True)
class EvidenceScores:
    """Result of :func:`evidence_scores` or :func:`elasticity_scores`, per domain (0 on inactive domains).

    ``advantage`` is the domain's descent score relative to the reference (the mixture's score with
    badly measured domains discounted), in units of the reference gradient signal (for
    :func:`elasticity_scores`: its relative marginal value); ``advantage_se`` its standard error;
    ``critical`` the standard errors an advantage had to exceed; ``scores`` the log-weight increments
    (nats) after shrinkage; ``reason`` says why there is no update ("" otherwise); ``alignment`` and
    ``alignment_se`` the alignment terms in the score and their standard errors (units of G; None
    without inner products).
    """

    scores: FloatArray
    advantage: FloatArray
    advantage_se: FloatArray
    critical: float
    reason: str
    alignment: FloatArray | None = None
    alignment_se: FloatArray | None = None


def soft_threshold(values: FloatArray, standard_errors: FloatArray, critical: float) -> FloatArray:
    """``sign(d) max(0, |d| - critical se)``: a difference within ``critical`` standard errors moves nothing,
    a larger one moves by its excess."""
    return np.sign(values) * np.maximum(np.abs(values) - critical * standard_errors, 0.0)


def precision_shares(variances: ArrayLike, active: NDArray[np.bool_]) -> FloatArray:
    """Weights ``p_j ~ 1 / (V_j + median V)`` over the active domains, summing to 1 (0 elsewhere).

    Like inverse-variance weights, they all but ignore a domain measured far worse than the typical
    one; unlike them, they stay near uniform while the variances are of one size, so that the
    sampling noise of the estimated variances (which grow with the estimates themselves) does not tilt
    the reference toward whichever domain happened to come out low (the median plays the part of the
    between-domain variance in a random-effects mean). All weight is shared equally by the domains
    with ``V_j + median V = 0``, if any.
    """
    variances = np.maximum(np.asarray(variances, dtype=np.float64), 0.0)
    spread = variances + float(np.median(variances[active]))
    exact = active & (spread == 0)
    if exact.any():
        return exact / exact.sum()
    precision = np.where(active, 1.0 / np.where(active, spread, 1.0), 0.0)
    return precision / precision.sum()


def evidence_scores(
    grad_sq_norms: ArrayLike,
    per_sample_variances: ArrayLike,
    grad_sq_var: ArrayLike,
    variance_var: ArrayLike,
    covariance: ArrayLike,
    weights: ArrayLike,
    *,
    batch_size: float,
    zeta_ratio: float,
    step_size: float,
    evidence_z: float,
    degrees_of_freedom: float = np.inf,
    loss_weights: ArrayLike | None = None,
    active: ArrayLike | None = None,
    inner_products: ArrayLike | None = None,
    inner_product_var: ArrayLike | None = None,
) -> EvidenceScores:
    """Log-weight increments that move only on evidence (PIKE_MATH.md s.9).

    Each domain's descent score per unit weight is Algorithm 1's ``u_k = y_k G_k - rho sigma_k^2/(2b)``
    (``rho = zeta_ratio``), with variance ``V_k`` from the statistics' sampling (co)variances. With
    ``inner_products`` (K, K) X_jk estimating <grad L_j, grad L_k> (diagonal ignored) and their variances
    ``inner_product_var``, the score is the descent of the whole objective per unit weight, not only of
    domain k's own loss: ``u_k += sum_{j != k} y_j X_jk`` (the alignment terms that Algorithm 1 drops under
    its low-conflict assumption), ``V_k += sum_{j != k} y_j^2 Var X_jk`` (covariances neglected), and the
    scale S below includes them (the whole objective's descent per unit weight, several times the domain's
    own when domains align). Only
    differences between domains move weights (renormalisation removes a common shift), so each score
    is taken relative to the mixture's, ``d_k = u_k - sum_j s_j u_j`` with ``s_j ~ w_j p_j``: the
    current weights ``w`` (once the mixture is made of the best domains, their differences are
    compared with each other and the weights settle), discounted by ``p_j ~ 1 / (V_j + median V)``
    (:func:`precision_shares`) so that one domain measured far worse than the others cannot hide
    every difference behind its noise. ``d_k`` is shrunk toward 0 by ``evidence_z`` standard errors
    (soft thresholding: ``sign(d) max(0, |d| - z se(d))``; with estimated standard errors of
    ``degrees_of_freedom``, z becomes the Student-t value ``z (1 + (z^2 + 1) / (4 dof))``, first order
    Cornish-Fisher, so that early checks with a poorly known noise shape need more evidence). The step
    is scale-free: ``step_size * shrunk_k / S`` nats with ``S = sum_j p_j y_j G_j`` the gradient signal
    of the domains (weighted by how well they are measured, not by the current weights: with the
    mixture's signal as the scale, weight piled on a domain whose G had since fallen to noise made S
    unmeasurable and froze the weights there). No update (scores 0, ``reason`` set) when a statistic
    is non-finite or S is not ``critical`` (``evidence_z``, Student-t corrected) standard errors above 0
    (no gradient to follow).
    """
    grad, variance = _statistics(grad_sq_norms, per_sample_variances)
    grad_var, variance_var, covariance = (_vector(name, value) for name, value in (
        ("grad_sq_var", grad_sq_var), ("variance_var", variance_var), ("covariance", covariance)))
    mix = _vector("weights", weights)
    _same_shape("grad_sq_norms", grad, grad_sq_var=grad_var, variance_var=variance_var, covariance=covariance,
                weights=mix)
    num_domains = grad.size
    mask = _active_mask(active, num_domains)
    coefficients = np.ones(num_domains) if loss_weights is None else _vector("loss_weights", loss_weights)
    _same_shape("grad_sq_norms", grad, loss_weights=coefficients)
    batch_size = _positive("batch_size", batch_size)
    rho = _non_negative("zeta_ratio", zeta_ratio)
    step_size = _positive("step_size", step_size)
    evidence_z = _non_negative("evidence_z", evidence_z)
    if not degrees_of_freedom > 0:
        raise ValueError(f"degrees_of_freedom must be > 0, got {degrees_of_freedom!r}")
    critical = evidence_z * (1.0 + (evidence_z**2 + 1.0) / (4.0 * degrees_of_freedom))
    zeros = np.zeros(num_domains)
    inputs = {"grad_sq_norms": grad, "per_sample_variances": variance, "grad_sq_var": grad_var,
              "variance_var": variance_var, "covariance": covariance, "loss_weights": coefficients}
    reason = _non_finite_reason(mask, inputs)
    if reason:
        return EvidenceScores(zeros, zeros, zeros, critical, reason)

    grad, variance, grad_var, variance_var, covariance, coefficients = (
        np.where(mask, values, 0.0) for values in inputs.values())
    noise_factor = rho / (2.0 * batch_size)
    score = np.where(mask, coefficients * grad - noise_factor * variance, 0.0)
    score_var = np.where(mask, coefficients**2 * np.maximum(grad_var, 0.0) + noise_factor**2 * np.maximum(
        variance_var, 0.0) - 2.0 * coefficients * noise_factor * covariance, 0.0)
    score_var = np.maximum(score_var, 0.0)
    descent, descent_var = coefficients * grad, coefficients**2 * np.maximum(grad_var, 0.0)
    terms: dict[str, FloatArray] = {}
    if inner_products is not None:
        alignment, alignment_var = alignment_terms(inner_products, inner_product_var, coefficients, mask)
        score, score_var = score + alignment, score_var + alignment_var
        descent, descent_var = descent + alignment, descent_var + alignment_var
        terms = {"alignment": alignment, "alignment_se": np.sqrt(alignment_var)}
    precision = precision_shares(score_var, mask)
    signal = float(np.sum(precision * descent))
    signal_se = float(np.sqrt(np.sum(precision**2 * descent_var)))
    if not signal > critical * signal_se:
        return EvidenceScores(zeros, zeros, zeros, critical, f"the domains' gradient signal {signal:.3g} is within "
                                                   f"{critical:.3g} standard errors ({signal_se:.3g}) of 0", **terms)
    shares = precision * np.where(mask, np.maximum(mix, 0.0), 0.0)
    if not shares.sum() > 0:
        raise ValueError("weights must have positive mass on the active domains")
    shares = shares / shares.sum()
    relative = np.where(mask, score - np.sum(shares * score), 0.0)
    # Var(u_k - sum_j s_j u_j) for independent domains: (1 - 2 s_k) V_k + sum_j s_j^2 V_j
    relative_se = np.where(mask, np.sqrt(np.maximum(
        (1.0 - 2.0 * shares) * score_var + np.sum(shares**2 * score_var), 0.0)), 0.0)
    shrunk = soft_threshold(relative, relative_se, critical)
    return EvidenceScores(step_size * shrunk / signal, relative / signal, relative_se / signal, critical, "", **terms)
