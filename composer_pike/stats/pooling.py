"""Pooling of each domain's probe statistics across checks (PIKE_MATH.md s.9).

One probe of a few dozen samples leaves G-hat's sign a coin toss when the noise scale sigma^2/G is in
the hundreds; the statistics drift slowly compared with a check interval, so averaging a domain's
recent probes turns many small probes into one large one. Every probe of domain k enters with weight 1
after the domain's earlier probes were multiplied by ``decay`` once per check since its last probe:
the pool's memory is measured in training time, so a domain probed in rotation (every r checks) is
not represented by probes much older than everyone else's (with a per-probe decay its pool would
span r times as many steps and lag the training by that much):

    pooled value     = sum_j w_j x_j / sum_j w_j
    pooled variance  = sum_j w_j^2 V_j / (sum_j w_j)^2          V_j: probe j's sampling variance
    effective samples = (sum_j w_j n_j)^2 / sum_j w_j^2 n_j      n_j: probe j's samples (n for equal probes:
                                                                 n (1 + d) / (1 - d) in the long run, d =
                                                                 decay^r for a domain probed every r checks)

Drift. A fixed decay assumes the statistics change little within a check interval, which is false early
in training: a domain's G falls several-fold between the first checks, and a pool still made mostly of
the probe on the untrained model keeps pushing the weights for checks after the gradient it measured has
gone. So before a probe is added, its G-hat and sigma^2-hat are compared with the pool's:
z = |new - pooled| / sqrt(V_new + V_pooled), the larger of the two, and the earlier probes' weight is
multiplied by ``exp(-(z^2 - drift_z^2) / 2)`` when z exceeds ``drift_z`` (5 standard errors: on statistics
that do not move, one false alarm in about a million comparisons under Gaussian errors). The factor is the
Gaussian likelihood of the discrepancy relative to the threshold's, so the pool forgets smoothly, and all
at once only for a change far outside its errors.

The factor is shared: every domain probed at a check forgets by the largest z among them. The weights
compare domains with each other, so their pools must describe the same model. Training moves every
domain's statistics at once (after the first interval each G falls 10-50x), but a per-domain test sees
the same fall at z = 4 in one domain and at 30 in another, depending on how well the untrained model's
probe was measured; one domain then kept the untrained model's G in its pool for several checks
while the others had forgotten theirs, and looked like the domain to train (one file-level split of one
corpus into four parts: 0.25 -> 0.11 for one part, its G 20x the others' only in the pools; 0.05 with the
alignment terms). A domain not probed at a check keeps its pool until its next probe.

Inner products between domains (X_jk, for PiKE's alignment terms) pool the same way per pair of domains
probed together, the pair's earlier probes multiplied by the smaller of its two domains' factors.

The noise shape kappa (see :mod:`.estimators`) pools with the slower ``shape_decay`` as a ratio of sums.
Plain numpy; the state is fixed-shape float lists, so it survives sharded checkpoints.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from composer_pike.stats.estimators import estimator_variances, inner_product_variances, noise_shape_evidence

FloatArray = NDArray[np.float64]
_SUMS = ('weight', 'weight_sq', 'grad_sum', 'variance_sum', 'loss_sum', 'grad_var_sum', 'variance_var_sum',
         'covariance_sum', 'sample_sum', 'sample_sq_sum', 'shape_num', 'shape_den', 'shape_weight', 'shape_weight_sq',
         'shape_dof', 'probes')
_PAIR_SUMS = ('pair_weight', 'pair_sum', 'pair_var_sum')  # (K, K): inner products of pairs probed together


class PooledStatistics:
    """Per-domain exponentially weighted G, sigma^2 and probe loss, with their standard errors.

    Args:
        num_domains: K.
        decay: weight kept by a domain's earlier probes per check (0 = no pooling: the latest probe
            only).
        shape_decay: the same for the noise shape kappa = 1/d_eff, which varies more slowly.
        drift_z: standard errors by which a probe must differ from the pool before the pool's earlier
            probes are forgotten faster (see the module docstring; ``inf``: never).
    """

    def __init__(self, num_domains: int, *, decay: float = 0.7, shape_decay: float = 0.9,
                 drift_z: float = 5.0) -> None:
        for name, value in (('decay', decay), ('shape_decay', shape_decay)):
            if not 0 <= value < 1:
                raise ValueError(f'{name} must be in [0, 1), got {value}')
        if not drift_z > 0:
            raise ValueError(f'drift_z must be > 0, got {drift_z}')
        self.num_domains = num_domains
        self.decay = decay
        self.shape_decay = shape_decay
        self.drift_z = drift_z
        self.last_drift = np.full(num_domains, np.nan)  # z of each domain's latest probe against its pool
        for name in _SUMS:
            setattr(self, name, np.zeros(num_domains))
        for name in _PAIR_SUMS:
            setattr(self, name, np.zeros((num_domains, num_domains)))

    def update(
        self,
        domains: ArrayLike,
        grad_sq_norms: ArrayLike,
        per_sample_variances: ArrayLike,
        chunk_sq_norms: ArrayLike,
        probe_losses: ArrayLike,
        *,
        num_chunks: int,
        chunk_size: int,
        checks_since_last_probe: ArrayLike = 1,
        inner_products: ArrayLike | None = None,
        inner_product_sketch_var: ArrayLike | None = None,
    ) -> tuple[FloatArray, FloatArray]:
        """Add one probe of ``domains`` (their G-hat, sigma^2-hat, (D, M) chunk norms and mean losses),
        ``checks_since_last_probe`` checks (per domain, or one for all) after each one's previous probe,
        and optionally their (D, D) inner products X_jk with the variance the gradient sketch adds to them
        (diagonals ignored; the sampling variance comes from :func:`.estimators.inner_product_variances`).

        Returns this probe's standard errors (of G-hat, of sigma^2-hat), one per probed domain.
        """
        index = np.asarray(domains, dtype=np.int64)
        elapsed = np.broadcast_to(np.asarray(checks_since_last_probe, dtype=np.float64), index.shape)
        if (elapsed < 1).any():
            raise ValueError(f'checks_since_last_probe must be >= 1, got {elapsed.tolist()}')
        grad = np.asarray(grad_sq_norms, dtype=np.float64)
        variance = np.asarray(per_sample_variances, dtype=np.float64)
        reference = np.where(self.probes[index] > 0, self.grad_sq_norms[index], grad)
        shape_num, shape_den = noise_shape_evidence(chunk_sq_norms, variance, reference, chunk_size=chunk_size)
        shape_keep = self.shape_decay**elapsed
        for name, value, factor in (('shape_num', shape_num, shape_keep),
                                    ('shape_den', shape_den, shape_keep),
                                    ('shape_weight', 1.0, shape_keep),
                                    ('shape_weight_sq', 1.0, shape_keep**2),
                                    ('shape_dof', num_chunks - 1.0, shape_keep)):
            total = getattr(self, name)
            total[index] = factor * total[index] + value
        grad_var, variance_var, covariance = estimator_variances(
            reference, variance, self.noise_shape[index], num_chunks=num_chunks, chunk_size=chunk_size)
        samples = float(num_chunks * chunk_size)
        drift = self._drift(index, grad, variance, grad_var, variance_var)
        self.last_drift[index] = drift
        with np.errstate(over='ignore', invalid='ignore'):  # z = inf (no error at all) forgets the pool entirely
            excess = np.where(drift > self.drift_z, drift**2 - self.drift_z**2, 0.0)  # NaN (first probe): 0
        # One memory for every domain probed together: the largest drift decides (see the module docstring).
        keep = self.decay**elapsed * np.exp(-excess.max(initial=0.0) / 2.0)
        keep_sq = keep**2
        for name, value, factor in (
                ('weight', 1.0, keep), ('weight_sq', 1.0, keep_sq), ('grad_sum', grad, keep),
                ('variance_sum', variance, keep), ('loss_sum', np.asarray(probe_losses, dtype=np.float64), keep),
                ('grad_var_sum', grad_var, keep_sq), ('variance_var_sum', variance_var, keep_sq),
                ('covariance_sum', covariance, keep_sq), ('sample_sum', samples, keep),
                ('sample_sq_sum', samples, keep_sq)):
            total = getattr(self, name)
            total[index] = factor * total[index] + value
        if inner_products is not None:
            inner_product_var = inner_product_variances(
                reference, variance, self.noise_shape[index], inner_product_sketch_var, num_chunks=num_chunks,
                chunk_size=chunk_size)
            self._update_pairs(index, keep, np.asarray(inner_products, dtype=np.float64), inner_product_var)
        self.probes[index] += 1
        return np.sqrt(grad_var), np.sqrt(variance_var)

    def _update_pairs(self, index: NDArray[np.int64], keep: FloatArray, inner_products: FloatArray,
                      inner_product_var: FloatArray) -> None:
        pairs = np.ix_(index, index)
        pair_keep = np.minimum.outer(keep, keep)
        off_diagonal = ~np.eye(index.size, dtype=bool)
        for name, value, factor in (('pair_weight', 1.0, pair_keep), ('pair_sum', inner_products, pair_keep),
                                    ('pair_var_sum', inner_product_var, pair_keep**2)):
            total = getattr(self, name)
            total[pairs] = np.where(off_diagonal, factor * total[pairs] + value, 0.0)

    def _drift(self, index: NDArray[np.int64], grad: FloatArray, variance: FloatArray, grad_var: FloatArray,
               variance_var: FloatArray) -> FloatArray:
        """z of a probe against its domain's pool: the larger of G's and sigma^2's (NaN if never probed)."""
        with np.errstate(divide='ignore', invalid='ignore'):
            z_grad = np.abs(grad - self.grad_sq_norms[index]) / np.sqrt(grad_var + self.grad_sq_var[index])
            z_variance = np.abs(variance - self.per_sample_variances[index]) / np.sqrt(
                variance_var + self.variance_var[index])
        return np.fmax(z_grad, z_variance)

    # ---- pooled values (NaN for a domain never probed) ----------------------------------------

    @property
    def seen(self) -> NDArray[np.bool_]:
        return self.probes > 0

    def _mean(self, total: FloatArray) -> FloatArray:
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(self.seen, total / self.weight, np.nan)

    def _mean_variance(self, total: FloatArray) -> FloatArray:
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(self.seen, total / self.weight**2, np.nan)

    @property
    def pairs_seen(self) -> NDArray[np.bool_]:
        """(K, K): pairs of distinct domains probed together at least once."""
        return self.pair_weight > 0

    @property
    def inner_products(self) -> FloatArray:
        """(K, K) pooled <grad L_j, grad L_k> for pairs probed together (0 elsewhere, diagonal 0)."""
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(self.pairs_seen, self.pair_sum / self.pair_weight, 0.0)

    @property
    def inner_product_var(self) -> FloatArray:
        """(K, K) sampling variance of :attr:`inner_products` (0 where unseen)."""
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(self.pairs_seen, self.pair_var_sum / self.pair_weight**2, 0.0)

    @property
    def grad_sq_norms(self) -> FloatArray:
        """Pooled ||grad L_k||^2 (unbiased pieces averaged; may be negative)."""
        return self._mean(self.grad_sum)

    @property
    def per_sample_variances(self) -> FloatArray:
        """Pooled per-sample gradient variance trace sigma_k^2."""
        return self._mean(self.variance_sum)

    @property
    def losses(self) -> FloatArray:
        """Pooled mean probe loss per domain (nats per token)."""
        return self._mean(self.loss_sum)

    @property
    def grad_sq_var(self) -> FloatArray:
        return self._mean_variance(self.grad_var_sum)

    @property
    def variance_var(self) -> FloatArray:
        return self._mean_variance(self.variance_var_sum)

    @property
    def covariance(self) -> FloatArray:
        """Pooled Cov(G, sigma^2) (negative: both share the chunk noise)."""
        return self._mean_variance(self.covariance_sum)

    @property
    def effective_samples(self) -> FloatArray:
        """Probe samples the pooled estimate is worth (see the module docstring)."""
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(self.seen, self.sample_sum**2 / self.sample_sq_sum, 0.0)

    @property
    def noise_shape(self) -> FloatArray:
        """kappa = tr(C^2) / tr(C)^2 = 1 / d_eff of the chunk noise (0 until measured)."""
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(self.shape_den > 0, np.maximum(self.shape_num, 0.0) / self.shape_den, 0.0)

    @property
    def degrees_of_freedom(self) -> FloatArray:
        """Degrees of freedom behind the standard errors (those of the noise shape: M - 1 per probe,
        counted like effective samples); 0 until measured."""
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(self.seen, self.shape_dof * self.shape_weight / self.shape_weight_sq, 0.0)

    # ---- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).tolist() for name in _SUMS + _PAIR_SUMS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        num_domains = self.num_domains
        # Checkpoints written before the pair sums existed resume with no pairs seen.
        state = {**{name: np.zeros((num_domains, num_domains)) for name in _PAIR_SUMS}, **state}
        for name in _SUMS + _PAIR_SUMS:
            values = np.asarray(state[name], dtype=np.float64)
            shape = (num_domains, num_domains) if name in _PAIR_SUMS else (num_domains,)
            if values.shape != shape:
                raise ValueError(f'pooled statistics {name!r} has shape {values.shape}, this mixture has '
                                 f'{num_domains} domains')
            setattr(self, name, values)
