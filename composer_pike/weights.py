"""Pure-numpy mixture-weight math for PiKE and Balanced-PiKE (float64, vectorised).

Section numbers refer to ``PIKE_MATH.md`` (Li et al., arXiv 2502.06244). Notation: ``G_k``
is the squared norm of domain k's full-batch gradient, ``sigma2_k`` the per-sample trace of
its gradient covariance (unit: one training sample = one packed sequence), ``b`` the
training batch size in samples, ``eta`` the learning rate, ``L`` the smoothness constant.

* Descent-bound coefficients (s.3):
  ``lambda_k = -eta*beta*G_k + L*eta^2*sigma2_k/(2b)``, ``kappa_k = L*eta^2*gamma*G_k``.
* Conceptual PiKE (s.3, s.4): the exact minimiser over the simplex of
  ``sum_k w_k*lambda_k + kappa_k*w_k^2/2``, by a sorted-threshold solve (:func:`kkt_weights`).
* Algorithm 1 (s.5, s.8): ``log w_k += clip(zeta1*y_k*G_k - zeta2*sigma2_k/(2b))``, then
  renormalise over active domains and project onto per-domain floor/cap bounds
  (:func:`pike_update`); ``y = 1`` for PiKE, ``y = K*softmax(tau*L_k)`` for Balanced-PiKE (s.6).
* Full mirror-descent score (s.5) for checking the ``gamma = 0`` reduction to Algorithm 1.
* The evidence-driven update (s.9, the default): Algorithm 1's scores relative to the mixture's
  (badly measured domains discounted), shrunk by their standard errors, in units of the domains'
  gradient signal
  (:func:`evidence_scores`), with ``zeta2/zeta1`` from the noise scale (:func:`auto_zeta_ratio`)
  and a floor of one sample per batch (:func:`default_min_weight`).
* Epoch caps from dataset sizes, and largest-remainder apportionment of a batch into integer
  per-domain counts (s.8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

_DEFAULT_FLOOR_MASS = 0.05  # the default floor is at least this total mass spread over active domains (s.8)
_FEASIBILITY_TOL = 1e-12  # slack on sum(lower) <= 1 <= sum(upper)


# --------------------------------------------------------------------------- validation


def _vector(name: str, value: ArrayLike) -> FloatArray:
    """Convert to a 1-D float64 array or raise ValueError naming the argument."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _same_shape(reference_name: str, reference: FloatArray, **others: FloatArray) -> None:
    """Raise ValueError unless every array in ``others`` has ``reference``'s shape."""
    for name, array in others.items():
        if array.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {array.shape} but {reference_name} has shape {reference.shape}"
            )


def _per_domain(name: str, value: ArrayLike, num_domains: int) -> FloatArray:
    """Broadcast a scalar or a length-K array to a float64 vector of length K."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return np.full(num_domains, float(array))
    if array.shape != (num_domains,):
        raise ValueError(f"{name} must be a scalar or have shape ({num_domains},), got {array.shape}")
    return array


def _active_mask(active: ArrayLike | None, num_domains: int) -> NDArray[np.bool_]:
    """Boolean mask of active domains (all active when None); at least one must be active."""
    if active is None:
        return np.ones(num_domains, dtype=bool)
    mask = np.asarray(active)
    if mask.shape != (num_domains,) or mask.dtype != np.bool_:
        raise ValueError(f"active must be a boolean array of shape ({num_domains},), got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise ValueError("active must mark at least one domain as active")
    return mask


def _positive(name: str, value: float) -> float:
    """Return ``value`` as float if finite and > 0, else raise ValueError."""
    number = float(value)
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return number


def _non_negative(name: str, value: float) -> float:
    """Return ``value`` as float if finite and >= 0, else raise ValueError."""
    number = float(value)
    if not (np.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return number


def _require_finite(name: str, array: FloatArray) -> None:
    """Raise ValueError naming the first non-finite entry of ``array``."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name} must be finite; domain {bad[0]} is {array[bad[0]]}")


def _non_finite_reason(mask: NDArray[np.bool_], arrays: dict[str, FloatArray]) -> str:
    """``"non-finite <name> for active domain(s) [...]"`` for the first array with a non-finite active
    entry, "" when every active entry is finite (no update rather than an error: statistics can be missing)."""
    for name, values in arrays.items():
        bad = np.flatnonzero(mask & ~np.isfinite(values))
        if bad.size:
            return f"non-finite {name} for active domain(s) {bad.tolist()}"
    return ""


def _statistics(
    grad_sq_norms: ArrayLike, per_sample_variances: ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Validate the per-domain statistic vectors ``G`` and ``sigma2`` (same 1-D shape)."""
    grad = _vector("grad_sq_norms", grad_sq_norms)
    variance = _vector("per_sample_variances", per_sample_variances)
    _same_shape("grad_sq_norms", grad, per_sample_variances=variance)
    return grad, variance


# --------------------------------------------------------------------------- conceptual PiKE (s.3, s.4)


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


# --------------------------------------------------------------------------- Algorithm 1 (s.5, s.6, s.8)


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


def project_to_bounds(
    weights: ArrayLike,
    lower: ArrayLike,
    upper: ArrayLike,
    *,
    active: ArrayLike | None = None,
) -> FloatArray:
    """Euclidean projection onto ``{lower_k <= w_k <= upper_k, sum_k w_k = 1}`` over active domains.

    The solution is ``clip(w - nu, lower, upper)`` for the shift ``nu`` at which the sum is 1;
    the sum is piecewise linear in ``nu`` with breakpoints ``w - upper`` and ``w - lower``, so
    ``nu`` is found exactly by sorting the breakpoints (O(K log K)). ``lower``/``upper`` are
    scalars or per-domain arrays; inactive domains get 0. Raises ValueError when infeasible.
    """
    values = _vector("weights", weights)
    num_domains = values.size
    mask = _active_mask(active, num_domains)
    floor = _per_domain("lower", lower, num_domains)[mask]
    cap = np.minimum(_per_domain("upper", upper, num_domains)[mask], 1.0)  # w <= 1 on the simplex
    point = values[mask]
    _require_finite("weights", np.where(mask, values, 0.0))
    _require_finite("lower", floor)
    if np.isnan(cap).any():
        raise ValueError("upper must not be NaN")
    if (floor < 0).any():
        raise ValueError(f"lower must be >= 0, got min {floor.min()}")
    crossed = np.flatnonzero(floor > cap)
    if crossed.size:
        index = np.flatnonzero(mask)[crossed[0]]
        raise ValueError(f"lower > upper for domain {index}: {floor[crossed[0]]} > {cap[crossed[0]]}")
    floor_mass, cap_mass = floor.sum(), cap.sum()
    if floor_mass > 1.0 + _FEASIBILITY_TOL or cap_mass < 1.0 - _FEASIBILITY_TOL:
        raise ValueError(
            f"infeasible bounds: need sum(lower) <= 1 <= sum(upper) over {point.size} active "
            f"domains, got sum(lower) = {float(floor_mass)!r}, sum(upper) = {float(cap_mass)!r}"
        )

    # s(nu) = sum clip(point - nu, floor, cap): equals cap_mass left of every breakpoint, slope
    # decreases by 1 at each ``point - cap`` and increases by 1 at each ``point - floor``.
    breakpoints = np.concatenate([point - cap, point - floor])
    slope_change = np.concatenate([-np.ones(point.size), np.ones(point.size)])
    order = np.argsort(breakpoints, kind="stable")
    breakpoints = breakpoints[order]
    slope = np.cumsum(slope_change[order])  # slope of s on [breakpoints[j], breakpoints[j + 1]]
    total_at = cap_mass + np.concatenate([[0.0], np.cumsum(slope[:-1] * np.diff(breakpoints))])
    reached = np.flatnonzero(total_at <= 1.0)
    if reached.size == 0:  # sum(lower) == 1 up to rounding: everything sits at its floor
        shift = breakpoints[-1]
    elif reached[0] == 0:  # sum(upper) == 1: everything sits at its cap
        shift = breakpoints[0]
    else:
        segment = reached[0] - 1
        shift = breakpoints[segment] + (total_at[segment] - 1.0) / -slope[segment]
    projected = np.zeros(num_domains)
    projected[mask] = np.clip(point - shift, floor, cap)
    return projected


@dataclass(frozen=True)
class PikeStep:
    """Result of one :func:`pike_update` check.

    ``log_weights``/``weights`` are the new state (``-inf``/0 on inactive domains), ``scores``
    the clipped increments actually added (0 when skipped or inactive), ``reason`` says why
    the update was skipped ("" otherwise).
    """

    log_weights: FloatArray
    weights: FloatArray
    scores: FloatArray
    skipped: bool
    reason: str


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


def apply_scores(
    log_weights: ArrayLike,
    scores: ArrayLike,
    *,
    active: ArrayLike | None = None,
    score_clip: float = 1.0,
    min_weight: ArrayLike,
    max_weight: ArrayLike = 1.0,
    reason: str = "",
) -> PikeStep:
    """Add log-weight increments and return the new weights (s.8): ``log w += clip(scores, +-score_clip)``,
    renormalise by logsumexp over active domains, project onto ``[min(min_weight, max_weight), max_weight]``
    (a cap below the floor wins, since caps encode data availability) and store the log of the projection.

    ``reason`` marks a skipped check (its scores must be 0): the weights are then only renormalised and
    projected, which leaves weights that already satisfy the bounds unchanged.
    """
    current = _vector("log_weights", log_weights)
    increments = _vector("scores", scores)
    _same_shape("log_weights", current, scores=increments)
    num_domains = current.size
    mask = _active_mask(active, num_domains)
    if np.isnan(current[mask]).any() or np.isposinf(current[mask]).any():
        raise ValueError("log_weights of active domains must not be NaN or +inf")
    if np.isneginf(current[mask]).all():
        raise ValueError("every active domain has log weight -inf; there is no mass to renormalise")
    score_clip = float(score_clip)
    if not score_clip > 0:
        raise ValueError(f"score_clip must be > 0, got {score_clip!r}")
    _require_finite("scores", increments[mask])
    clipped = np.zeros(num_domains)
    clipped[mask] = np.clip(increments[mask], -score_clip, score_clip)

    shifted = current[mask] + clipped[mask]
    unnormalised = np.exp(shifted - shifted.max())
    normalised = np.zeros(num_domains)
    normalised[mask] = unnormalised / unnormalised.sum()  # logsumexp renormalisation

    cap = _per_domain("max_weight", max_weight, num_domains)
    floor = np.minimum(_per_domain("min_weight", min_weight, num_domains), cap)
    weights = project_to_bounds(normalised, floor, cap, active=mask)
    with np.errstate(divide="ignore"):
        new_log_weights = np.where(mask, np.log(weights), -np.inf)
    return PikeStep(new_log_weights, weights, clipped, bool(reason), reason)


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


# --------------------------------------------------------------------------- evidence-driven update (s.9)


def default_min_weight(num_active: int, batch_size: float) -> float:
    """Default floor per active domain: ``max(0.05/K, 1/b)``, at most ``1/K``.

    ``1/b`` keeps at least one sample of every active domain in every batch of ``b`` samples, which is
    what Mix means (0.05/K alone is 0.4 samples at b = 48, K = 6); ``1/K`` keeps the floors feasible when
    there are more domains than batch slots.
    """
    if num_active < 1:
        raise ValueError(f"num_active must be >= 1, got {num_active}")
    batch_size = _positive("batch_size", batch_size)
    return min(1.0 / num_active, max(_DEFAULT_FLOOR_MASS / num_active, 1.0 / batch_size))


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


@dataclass(frozen=True)
class EvidenceScores:
    """Result of :func:`evidence_scores` or :func:`elasticity_scores`, per domain (0 on inactive domains).

    ``advantage`` is the domain's descent score relative to the reference (the mixture's score with
    badly measured domains discounted), in units of the reference gradient signal (for
    :func:`elasticity_scores`: its relative marginal value); ``advantage_se`` its standard error;
    ``critical`` the standard errors an advantage had to exceed; ``scores`` the log-weight increments
    (nats) after shrinkage; ``reason`` says why there is no update ("" otherwise).
    """

    scores: FloatArray
    advantage: FloatArray
    advantage_se: FloatArray
    critical: float
    reason: str


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
) -> EvidenceScores:
    """Log-weight increments that move only on evidence (PIKE_MATH.md s.9).

    Each domain's descent score per unit weight is Algorithm 1's ``u_k = y_k G_k - rho sigma_k^2/(2b)``
    (``rho = zeta_ratio``), with variance ``V_k`` from the statistics' sampling (co)variances. Only
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
    is non-finite or S is not ``evidence_z`` standard errors above 0 (no gradient to follow).
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
    precision = precision_shares(score_var, mask)
    signal = float(np.sum(precision * coefficients * grad))
    signal_se = float(np.sqrt(np.sum(precision**2 * coefficients**2 * np.maximum(grad_var, 0.0))))
    if not signal > critical * signal_se:
        return EvidenceScores(zeros, zeros, zeros, critical, f"the domains' gradient signal {signal:.3g} is within "
                                                   f"{critical:.3g} standard errors ({signal_se:.3g}) of 0")
    shares = precision * np.where(mask, np.maximum(mix, 0.0), 0.0)
    if not shares.sum() > 0:
        raise ValueError("weights must have positive mass on the active domains")
    shares = shares / shares.sum()
    relative = np.where(mask, score - np.sum(shares * score), 0.0)
    # Var(u_k - sum_j s_j u_j) for independent domains: (1 - 2 s_k) V_k + sum_j s_j^2 V_j
    relative_se = np.where(mask, np.sqrt(np.maximum(
        (1.0 - 2.0 * shares) * score_var + np.sum(shares**2 * score_var), 0.0)), 0.0)
    shrunk = np.sign(relative) * np.maximum(np.abs(relative) - critical * relative_se, 0.0)
    return EvidenceScores(step_size * shrunk / signal, relative / signal, relative_se / signal, critical, "")


# --------------------------------------------------------------------------- loss-elasticity update


def elasticity_scores(
    elasticities: ArrayLike,
    standard_errors: ArrayLike,
    weights: ArrayLike,
    *,
    step_size: float,
    evidence_z: float,
    loss_weights: ArrayLike | None = None,
    active: ArrayLike | None = None,
) -> EvidenceScores:
    """Log-weight increments from loss elasticities ``e_k = -dL_k / d log n_k`` (nats per e-fold of samples).

    With ``n_k = w_k T``, the marginal value of weight is ``-d(sum_j y_j L_j)/dw_k = y_k e_k / w_k``
    (``y = 1``: the average loss; Balanced-PiKE's ``y``: the tilted one); the mixture's mean of it is
    ``S = sum_j y_j e_j``, and the weights are optimal when every domain's value equals ``S``
    (``w_k ~ y_k e_k``). Each domain's advantage ``a_k = y_k e_k / (w_k S) - 1`` (standard error
    ``y_k se_k / (w_k S)``) is shrunk toward 0 by ``evidence_z`` standard errors and taken as
    ``step_size * shrunk_k`` nats: weights move while the evidence says a domain is worth more or less
    than its share, and stay put where it does not (a domain at the floor, measured on few samples,
    is not pushed back up by its own noise). No update (``reason`` set) without finite elasticities or
    with ``S`` not positive.
    """
    values = _vector("elasticities", elasticities)
    errors = _vector("standard_errors", standard_errors)
    mix = _vector("weights", weights)
    _same_shape("elasticities", values, standard_errors=errors, weights=mix)
    num_domains = values.size
    mask = _active_mask(active, num_domains)
    coefficients = np.ones(num_domains) if loss_weights is None else _vector("loss_weights", loss_weights)
    _same_shape("elasticities", values, loss_weights=coefficients)
    step_size = _positive("step_size", step_size)
    evidence_z = _non_negative("evidence_z", evidence_z)
    zeros = np.zeros(num_domains)
    reason = _non_finite_reason(mask, {"elasticities": values, "standard_errors": errors, "loss_weights": coefficients})
    if reason:  # an elasticity is NaN until its domain has two bins in its window
        return EvidenceScores(zeros, zeros, zeros, evidence_z, reason)
    if not (mix[mask] > 0).all():
        raise ValueError(f"weights must be > 0 on the active domains, got {mix[mask].tolist()}")
    signal = float(np.sum(np.where(mask, coefficients * values, 0.0)))
    if not signal > 0:
        return EvidenceScores(zeros, zeros, zeros, evidence_z,
                              f"the domains' summed loss elasticity {signal:.3g} is not positive")
    share = np.where(mask, mix, 1.0) * signal
    advantage = np.where(mask, coefficients * values / share - 1.0, 0.0)
    advantage_se = np.where(mask, coefficients * errors / share, 0.0)
    shrunk = np.sign(advantage) * np.maximum(np.abs(advantage) - evidence_z * advantage_se, 0.0)
    return EvidenceScores(step_size * shrunk, advantage, advantage_se, evidence_z, "")


# --------------------------------------------------------------------------- data budget and batch counts


def epoch_cap_upper_bounds(
    domain_samples: ArrayLike,
    samples_remaining: float,
    max_epochs: float,
    samples_consumed: ArrayLike | None = None,
) -> FloatArray:
    """Largest weight per domain that keeps it within ``max_epochs`` passes over its data.

    If the remaining ``samples_remaining`` training samples (global count) were drawn at
    weight ``w_k``, domain k would use ``w_k * samples_remaining`` more samples on top of the
    ``samples_consumed[k]`` already used, out of a budget of ``max_epochs * domain_samples[k]``.
    Hence ``upper_k = clip((max_epochs*N_k - consumed_k) / samples_remaining, 0, 1)``; all
    counts are in samples. ``max_epochs = inf`` means unlimited (all ones).
    """
    sizes = _vector("domain_samples", domain_samples)
    _require_finite("domain_samples", sizes)
    if (sizes < 0).any():
        raise ValueError("domain_samples must be >= 0")
    consumed = np.zeros_like(sizes) if samples_consumed is None else _vector("samples_consumed", samples_consumed)
    _same_shape("domain_samples", sizes, samples_consumed=consumed)
    _require_finite("samples_consumed", consumed)
    if (consumed < 0).any():
        raise ValueError("samples_consumed must be >= 0")
    remaining = _positive("samples_remaining", samples_remaining)
    if not (float(max_epochs) > 0):
        raise ValueError(f"max_epochs must be > 0, got {max_epochs!r}")
    if np.isposinf(max_epochs):
        return np.ones_like(sizes)
    return np.clip((float(max_epochs) * sizes - consumed) / remaining, 0.0, 1.0)


def apportion(weights: ArrayLike, total: int, *, min_count: int = 0) -> NDArray[np.int64]:
    """Split ``total`` samples into integer per-domain counts (largest-remainder / Hamilton).

    Each domain first gets ``floor(quota_k)`` with ``quota_k = total*w_k/sum(w)``; the leftover
    units go to the largest fractional parts, ties to the lower domain index. Counts sum to
    ``total`` exactly, lie in ``[floor(quota_k), ceil(quota_k)]``, and are 0 where ``w_k = 0``.

    ``min_count > 0``: if ``total >= min_count * P`` (``P`` = number of positive weights),
    every positive-weight domain is raised to ``min_count``, taking each missing unit from the
    domain whose count most exceeds its quota (ties: the higher index gives first) without
    pushing it below ``min_count``. Otherwise the positive domains, by decreasing weight (ties:
    lower index first), receive ``min_count`` each until ``total`` runs out (the last may get less).
    """
    shares = _vector("weights", weights)
    _require_finite("weights", shares)
    if (shares < 0).any() or not shares.sum() > 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    for name, value in (("total", total), ("min_count", min_count)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    positive = shares > 0
    if min_count and total < min_count * np.count_nonzero(positive):
        return _greedy_minimums(shares, int(total), int(min_count))

    quota = total * (shares / shares.sum())
    counts = np.floor(quota).astype(np.int64)
    remainder = np.where(positive, quota - counts, -1.0)
    leftover = int(total - counts.sum())
    counts[np.argsort(-remainder, kind="stable")[:leftover]] += 1
    if min_count:
        _raise_to_minimum(counts, quota, positive, int(min_count))
    return counts


def _greedy_minimums(shares: FloatArray, total: int, min_count: int) -> NDArray[np.int64]:
    """``min_count`` each to the heaviest positive domains until ``total`` is used up."""
    by_weight = np.argsort(-shares, kind="stable")[: np.count_nonzero(shares > 0)]
    counts = np.zeros(shares.size, dtype=np.int64)
    counts[by_weight] = np.clip(total - min_count * np.arange(by_weight.size), 0, min_count)
    return counts


def _raise_to_minimum(
    counts: NDArray[np.int64], quota: FloatArray, positive: NDArray[np.bool_], min_count: int
) -> None:
    """In place: lift positive domains to ``min_count`` using units from the most over-quota ones.

    Removing units one at a time from the domain with the largest ``count - quota`` is the same
    as taking the ``deficit`` largest unit priorities ``count_k - quota_k - j`` (j-th unit given
    by domain k, j < count_k - min_count), since priorities decrease within a domain.
    """
    shortfall = np.where(positive, np.maximum(min_count - counts, 0), 0)
    deficit = int(shortfall.sum())
    if deficit == 0:
        return
    spare = np.where(positive, counts - min_count, 0)
    donors = np.flatnonzero(spare > 0)[::-1]  # descending index: stable ties favour the higher one
    units = np.arange(min(deficit, int(spare[donors].max())))
    priority = (counts[donors] - quota[donors])[:, None] - units[None, :]
    priority = np.where(units[None, :] < spare[donors, None], priority, -np.inf)
    chosen = np.argsort(-priority.ravel(), kind="stable")[:deficit]  # flattened as (donor, unit)
    counts -= np.bincount(donors[chosen // units.size], minlength=counts.size)
    counts += shortfall
