"""Per-domain training-loss trends: how fast each domain's loss still falls per log-sample it trains on.

Every training sample is scored by the forward pass that trains on it, before the step that uses it,
so on a domain's first pass the mean loss of its training samples estimates its held-out loss at no
extra forward or backward work. Binned by check interval, those means give each domain's loss
elasticity ``e_k = -dL_k / d log n_k`` (nats per e-fold of the domain's trained samples ``n_k``): a
weighted least-squares slope over the bins of the domain's last ``window``-fold of samples, with a
standard error from the bins' sampling variances (inflated by the fit's reduced chi-square when the
curve bends more than the noise allows).

Measured against the domain's own samples, not the step, the slope does not grow when the domain's
weight does, so following it has no feedback of its own.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
MIN_BINS = 2  # bins a slope needs (with their sampling variances, two bins give a slope and its SE)


def mean_log_samples(start: ArrayLike, end: ArrayLike) -> FloatArray:
    """Mean of ``log n`` for ``n`` uniform on ``[start, end]`` (samples; ``start`` may be 0).

    A bin's samples are trained at every count between its start and end, so its mean loss belongs
    to this mean, not to the log of its midpoint (they differ by up to 1 nat in the first bin).
    """
    low, high = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
        def antiderivative(n: FloatArray) -> FloatArray:
            return np.where(n > 0, n * np.log(np.where(n > 0, n, 1.0)) - n, 0.0)
        mean = (antiderivative(high) - antiderivative(low)) / (high - low)
        return np.where(high > low, mean, np.log(high))


class LossTrend:
    """Binned per-domain training losses of a run and the elasticity fit over their recent bins.

    Each bin holds, per domain, the sum of its samples' losses (nats, each sample's mean over its
    tokens), the sum of their squares and their count, all over ranks. The history grows by one
    bin of ``3 K`` numbers per check, so it is checkpointed whole.
    """

    def __init__(self, num_domains: int) -> None:
        if num_domains < 1:
            raise ValueError(f'num_domains must be >= 1, got {num_domains}')
        self.num_domains = num_domains
        self.loss_sums = np.zeros((0, num_domains))
        self.loss_sq_sums = np.zeros((0, num_domains))
        self.counts = np.zeros((0, num_domains))

    @property
    def num_bins(self) -> int:
        return self.counts.shape[0]

    @property
    def samples_seen(self) -> FloatArray:
        """Training samples scored per domain so far."""
        return self.counts.sum(axis=0)

    def add_bin(self, loss_sums: ArrayLike, loss_sq_sums: ArrayLike, counts: ArrayLike) -> None:
        """Append one interval's per-domain loss sums, sums of squares and sample counts."""
        rows = [np.asarray(values, dtype=np.float64).reshape(1, -1) for values in (loss_sums, loss_sq_sums, counts)]
        for name, row in zip(('loss_sums', 'loss_sq_sums', 'counts'), rows):
            if row.shape[1] != self.num_domains:
                raise ValueError(f'{name} has {row.shape[1]} entries for {self.num_domains} domains')
            if not np.isfinite(row).all():
                raise ValueError(f'{name} must be finite, got {row.ravel().tolist()}')
        if (rows[2] < 0).any():
            raise ValueError(f'counts must be >= 0, got {rows[2].ravel().tolist()}')
        self.loss_sums = np.vstack([self.loss_sums, rows[0]])
        self.loss_sq_sums = np.vstack([self.loss_sq_sums, rows[1]])
        self.counts = np.vstack([self.counts, rows[2]])

    def latest_losses(self) -> FloatArray:
        """Each domain's mean training loss in its most recent bin with samples (NaN if none)."""
        filled = self.counts > 0
        if not self.num_bins:
            return np.full(self.num_domains, np.nan)
        last = self.num_bins - 1 - np.argmax(filled[::-1], axis=0)  # each column's last filled bin
        columns = np.arange(self.num_domains)
        counts = self.counts[last, columns]
        with np.errstate(invalid='ignore', divide='ignore'):
            return np.where(counts > 0, self.loss_sums[last, columns] / counts, np.nan)

    def elasticities(self, window: float) -> tuple[FloatArray, FloatArray, NDArray[np.int64]]:
        """Per domain ``(e_k, its standard error, bins used)`` over the bins that start within the
        last ``window``-fold of the domain's samples (``n_start >= n_now / window``).

        ``e_k`` is minus the weighted least-squares slope of the bins' mean loss against their
        :func:`mean_log_samples`, each bin weighted by ``count / per-sample variance``. NaN where a
        domain has fewer than :data:`MIN_BINS` usable bins (two samples or more, variance > 0).
        """
        if not window > 1:
            raise ValueError(f'window must be > 1, got {window}')
        counts = self.counts
        ends = np.cumsum(counts, axis=0)
        starts = ends - counts
        x = mean_log_samples(starts, ends)
        with np.errstate(divide='ignore', invalid='ignore'):
            means = self.loss_sums / counts
            variances = (self.loss_sq_sums - counts * means**2) / (counts - 1)
            precision = np.where((counts >= 2) & (variances > 0), counts / variances, 0.0)
        recent = starts >= ends[-1:] / window  # ends[-1:] is each domain's samples so far
        weight = np.where(recent, precision, 0.0)
        bins = np.count_nonzero(weight > 0, axis=0)
        x, means = np.where(weight > 0, x, 0.0), np.where(weight > 0, means, 0.0)
        total = weight.sum(axis=0)
        with np.errstate(divide='ignore', invalid='ignore'):
            x_bar = (weight * x).sum(axis=0) / total
            y_bar = (weight * means).sum(axis=0) / total
            spread = (weight * (x - x_bar) ** 2).sum(axis=0)
            slope = (weight * (x - x_bar) * (means - y_bar)).sum(axis=0) / spread
            residual = weight * (means - y_bar - slope * (x - x_bar)) ** 2
            reduced_chi2 = np.where(bins > MIN_BINS, residual.sum(axis=0) / (bins - MIN_BINS), 1.0)
            se = np.sqrt(np.maximum(reduced_chi2, 1.0) / spread)
        usable = (bins >= MIN_BINS) & (spread > 0)
        return np.where(usable, -slope, np.nan), np.where(usable, se, np.nan), bins

    def state_dict(self) -> dict[str, Any]:
        return {'loss_sums': self.loss_sums.tolist(), 'loss_sq_sums': self.loss_sq_sums.tolist(),
                'counts': self.counts.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        arrays = [np.asarray(state[key], dtype=np.float64).reshape(-1, self.num_domains)
                  for key in ('loss_sums', 'loss_sq_sums', 'counts')]
        self.loss_sums, self.loss_sq_sums, self.counts = arrays
