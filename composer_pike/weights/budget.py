"""Data budget and batch counts (s.8): the largest weight that keeps a domain within an epoch cap,
and largest-remainder apportionment of a batch into integer per-domain counts.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from composer_pike.weights._checks import FloatArray, _positive, _require_finite, _same_shape, _vector


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
