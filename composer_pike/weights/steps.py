"""One check's weight step in log space (s.8), shared by every update rule: add the scores (clipped),
renormalise over the active domains, project onto per-domain floor/cap bounds; and the default floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from composer_pike.weights._checks import (FloatArray, _active_mask, _per_domain, _positive, _require_finite,
                                           _same_shape, _vector)


_DEFAULT_FLOOR_MASS = 0.05  # the default floor is at least this total mass spread over active domains (s.8)
_FEASIBILITY_TOL = 1e-12  # slack on sum(lower) <= 1 <= sum(upper)


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
