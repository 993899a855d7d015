"""Argument checks shared by the weight math: per-domain float64 vectors, active masks, scalars and
finiteness, each failing with a ValueError that names the argument (and the domain).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


FloatArray = NDArray[np.float64]


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
