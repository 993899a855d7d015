"""The PiKE Composer algorithm: glue between Composer events, gradient statistics and the mixture loader.

Every ``check_interval`` steps, at BEFORE_TRAIN_BATCH (whose gradients the trainer's own
``zero_grad`` wipes right after), the algorithm runs ``num_chunks`` chunk micro-batches of up to
``domains_per_check`` domains through the model (least recently probed first) and turns the chunk
gradients into G_k and sigma_k^2 (:mod:`composer_pike.stats`), pooled across checks with their
standard errors. At BATCH_END it applies one update (:mod:`composer_pike.weights`) and schedules the
new weights on the loader, which uses them from step ``t + 1 + delay``.

The weights themselves live in the loader's schedule, which Composer checkpoints with the dataset
state; the algorithm's own state is the pooled statistics and counters.
"""
from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import numpy as np
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from composer_pike.algorithms.common import check_step_options, find_mixture, weight_cap, weight_floor
from composer_pike.algorithms.conflicts import conflict_report
from composer_pike.algorithms.probe import probe_gradients
from composer_pike.data import MixtureDataset
from composer_pike.stats import (
    GradientStatistics,
    PooledStatistics,
    cosine_intervals,
)
from composer_pike.weights import (
    PikeStep,
    apply_scores,
    auto_zeta_ratio,
    balanced_coefficients,
    evidence_scores,
    kkt_update,
    pike_update,
)

log = logging.getLogger(__name__)
UPDATES = ('evidence', 'paper', 'kkt')  # how the weights follow the statistics
MAX_DOMAINS_PER_CHECK = 8  # default probe budget: larger mixtures are probed in rotation


class PiKE(Algorithm):
    """PiKE adaptive data mixing (Li et al., arXiv 2502.06244), Balanced-PiKE with ``tau > 0``.

    Args:
        check_interval: optimizer steps between weight updates (the paper's T0).
        first_check: batch before which the first check runs (default ``check_interval``: after one
            interval, not on the untrained model, where every domain's gradient points the same way and
            PiKE's low-alignment assumption fails); checks follow every ``check_interval`` steps. The
            first check probes every active domain, whatever ``domains_per_check``, so that no domain's
            statistics start from an earlier model.
        estimation_batch_size: probe samples per probed domain per check, over all ranks; split into
            ``num_chunks`` chunks of ``estimation_batch_size / num_chunks`` samples.
        num_chunks: chunks M per domain (>= 2).
        domains_per_check: domains probed per check, least recently probed first (``None``: all
            when there are at most 8, else 8). The probe then costs at most
            ``8 * estimation_batch_size`` samples per check whatever K; pooling carries each
            domain's statistics between its probes.
        update: ``'evidence'`` (default): Algorithm 1's scores relative to the mixture's, shrunk by
            ``evidence_z`` standard errors, ``step_size`` nats per unit of the domains' gradient
            signal (weights move when the statistics say so). ``'paper'``: Algorithm 1 with the
            explicit constants ``zeta1``/``zeta2``, never recalibrated. ``'kkt'``: conceptual PiKE,
            the exact minimiser of the descent bound with ``smoothness``, ``beta``, ``gamma`` and the
            optimizer's current learning rate.
        alignment: add the alignment terms to the evidence score (``update='evidence'``): each domain's
            score becomes the descent of the whole objective per unit of its weight, its own
            ``y_k G_k`` plus ``sum_j y_j <grad L_j, grad L_k>`` over the other domains, from the pooled
            inner products of the gradient sketch (needs ``conflict_sketch_size`` > 0; pairs of domains
            never probed together contribute nothing). Algorithm 1 drops them (low conflict). Default
            (``None``): on with ``update='evidence'`` and the sketch, off otherwise.
        step_size: nats of log-weight per check for a domain whose score exceeds the mixture's by
            the domains' gradient signal (``update='evidence'``; see
            :func:`composer_pike.weights.evidence_scores`).
        evidence_z: standard errors a score difference must exceed before it moves weights (more
            while the standard errors rest on few probes: see :func:`composer_pike.weights.evidence_scores`).
        zeta_ratio: zeta2/zeta1 (``'auto'``: b / (b + B) from the mixture's noise scale B; see
            :func:`composer_pike.weights.auto_zeta_ratio`). Used by ``'evidence'``, and by ``'kkt'``
            through ``smoothness='auto'``.
        zeta1, zeta2: Algorithm 1's step sizes of the G and sigma^2 terms (``update='paper'`` only).
        smoothness: L of the descent bound for ``'kkt'``; ``'auto'`` gives L eta / beta = zeta_ratio.
        beta, gamma: the bound's conflict constants for ``'kkt'`` (1 = no conflict, no alignment).
        pool_decay: weight a domain's earlier probes keep per check (0 = latest probe only): the pool
            remembers about ``(1 + d) / (1 - d)`` checks' worth of training, however often the
            domain is probed.
        drift_z: standard errors by which a domain's new probe must differ from its pooled G or sigma^2
            before the pools forget their earlier probes faster (``exp(-(z^2 - drift_z^2) / 2)``, the
            largest z among the domains probed together deciding for all; see
            :mod:`composer_pike.stats.pooling`): early in training the statistics fall several-fold
            between checks.
        score_clip: per-check cap on |log-weight change| (nats).
        min_weight: floor on every active weight (default ``max(0.05/K, 1/b)``, at most 1/K: at
            least one sample of every domain per batch).
        max_weight: cap on every weight.
        tau: Balanced-PiKE temperature of the tilted objective (0 = plain PiKE; the paper's best: 3).
        max_epochs_per_domain: optional cap on passes over each domain for the whole run, folded
            into the weight cap (needs ``max_duration`` in ba, sp, tok or ep).
        conflict_threshold: warn when the 95% interval of a cosine between two domains' gradients
            lies below this (PiKE assumes low gradient conflict).
        conflict_sketch_size: floats per domain of the signed count sketch of its probe gradient, behind
            the conflict monitor's cosines and the alignment terms (0 = off; exact when it covers a rank's
            gradient coordinates).
        probe_microbatch_size: per-rank samples per probe forward/backward; default: the trainer's
            device_train_microbatch_size (or the whole per-rank chunk).
    """

    def __init__(
        self,
        check_interval: int = 1000,
        first_check: int | None = None,
        estimation_batch_size: int = 256,
        num_chunks: int = 8,
        domains_per_check: int | None = None,
        update: str = 'evidence',
        alignment: bool | None = None,
        step_size: float = 0.5,
        evidence_z: float = 2.5,
        zeta_ratio: float | str = 'auto',
        zeta1: float | None = None,
        zeta2: float | None = None,
        smoothness: float | str = 'auto',
        beta: float = 1.0,
        gamma: float = 1.0,
        pool_decay: float = 0.7,
        drift_z: float = 5.0,
        score_clip: float = 1.0,
        min_weight: float | None = None,
        max_weight: float = 1.0,
        tau: float = 0.0,
        max_epochs_per_domain: float | None = None,
        conflict_threshold: float = -0.2,
        conflict_sketch_size: int = 65536,
        probe_microbatch_size: int | None = None,
    ) -> None:
        if check_interval < 1:
            raise ValueError(f'check_interval must be >= 1, got {check_interval}')
        if first_check is not None and first_check < 0:
            raise ValueError(f'first_check must be >= 0, got {first_check}')
        if num_chunks < 2:
            raise ValueError(f'num_chunks must be >= 2 (the variance estimate needs two chunks), got {num_chunks}')
        if estimation_batch_size < num_chunks or estimation_batch_size % num_chunks:
            raise ValueError(f'estimation_batch_size ({estimation_batch_size}) must be a positive multiple of '
                             f'num_chunks ({num_chunks})')
        if domains_per_check is not None and domains_per_check < 1:
            raise ValueError(f'domains_per_check must be >= 1 or None, got {domains_per_check}')
        if update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(UPDATES)}, got {update!r}")
        if alignment is None:
            alignment = update == 'evidence' and conflict_sketch_size > 0
        if alignment and update != 'evidence':
            raise ValueError(f"alignment=True is an option of update='evidence', got update={update!r}")
        if alignment and conflict_sketch_size < 1:
            raise ValueError('alignment=True needs the gradient sketch: conflict_sketch_size must be > 0, '
                             f'got {conflict_sketch_size}')
        if (zeta1 is None) != (zeta2 is None):
            raise ValueError('set both zeta1 and zeta2, or neither')
        if (zeta1 is not None) != (update == 'paper'):
            raise ValueError("zeta1 and zeta2 are the constants of update='paper', which needs them "
                             f'(got update={update!r}, zeta1={zeta1}, zeta2={zeta2})')
        for name, value in (('zeta1', zeta1), ('zeta2', zeta2)):
            if value is not None and not value > 0:
                raise ValueError(f'{name} must be > 0, got {value}')
        for name, value in (('zeta_ratio', zeta_ratio), ('smoothness', smoothness)):
            if value != 'auto' and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be 'auto' or > 0, got {value!r}")
        for name, value in (('beta', beta), ('gamma', gamma)):
            if not value > 0:
                raise ValueError(f'{name} must be > 0, got {value}')
        if not 0 <= pool_decay < 1:
            raise ValueError(f'pool_decay must be in [0, 1), got {pool_decay}')
        if not drift_z > 0:
            raise ValueError(f'drift_z must be > 0, got {drift_z}')
        check_step_options(step_size=step_size, evidence_z=evidence_z, score_clip=score_clip, tau=tau,
                           max_epochs_per_domain=max_epochs_per_domain)
        self.check_interval = check_interval
        self.first_check = check_interval if first_check is None else int(first_check)
        self.estimation_batch_size = estimation_batch_size
        self.num_chunks = num_chunks
        self.domains_per_check = domains_per_check
        self.update = update
        self.alignment = bool(alignment)
        self.step_size = step_size
        self.evidence_z = evidence_z
        self.zeta_ratio = zeta_ratio
        self.zeta1 = zeta1
        self.zeta2 = zeta2
        self.smoothness = smoothness
        self.beta = beta
        self.gamma = gamma
        self.pool_decay = pool_decay
        self.drift_z = drift_z
        self.score_clip = score_clip
        self.min_weight = min_weight
        self.max_weight = max_weight
        self.tau = tau
        self.max_epochs_per_domain = max_epochs_per_domain
        self.conflict_threshold = conflict_threshold
        self.conflict_sketch_size = conflict_sketch_size
        self.probe_microbatch_size = probe_microbatch_size
        self.checks = 0
        self.probe_samples = 0  # global samples the probe has run forward/backward
        self.mixture: MixtureDataset | None = None
        self.pooled: PooledStatistics | None = None
        self._last_probed: np.ndarray | None = None  # check count at each domain's last probe (-1: never)
        self._loaded: dict[str, Any] | None = None  # state loaded before the mixture was attached
        self._pending: tuple[GradientStatistics, np.ndarray, np.ndarray] | None = None

    # ---- Composer wiring ---------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event == Event.FIT_START:
            return True
        if self.mixture is None or self.mixture.num_domains < 2:
            return False
        if event == Event.BEFORE_TRAIN_BATCH:
            # Composer fires BEFORE_TRAIN_BATCH again when it retries a batch after a CUDA OOM (automatic
            # microbatching): the probe already pending for this batch stands.
            since_first = int(state.timestamp.batch) - self.first_check
            return since_first >= 0 and since_first % self.check_interval == 0 and self._pending is None
        return event == Event.BATCH_END and self._pending is not None

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._attach(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._pending = self._probe(state)
        else:
            self._update(state, logger)

    def state_dict(self) -> dict[str, Any]:
        # Per-domain state travels as one JSON string: sharded (DCP) checkpoints load only into
        # entries that exist before the load, and K is unknown until the mixture is attached.
        domains = None if self.pooled is None else {
            'pooled': self.pooled.state_dict(), 'last_probed': self._last_probed.tolist()}
        return {'checks': int(self.checks), 'probe_samples': int(self.probe_samples),
                'domains': json.dumps(domains)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checks = int(state['checks'])
        self.probe_samples = int(state['probe_samples'])
        self._loaded = json.loads(state['domains'])
        if self.mixture is not None:
            self._restore_domains()

    # ---- steps -------------------------------------------------------------------------------

    def _attach(self, state: State) -> None:
        self.mixture = find_mixture(state, 'PiKE')
        num_domains = self.mixture.num_domains
        if num_domains < 2:
            warnings.warn(f'PiKE has nothing to mix: the loader has one domain ({self.mixture.domain_names[0]})')
            return
        world_size = dist.get_world_size()
        chunk = self.estimation_batch_size // self.num_chunks
        if chunk % world_size:
            raise ValueError(f'estimation_batch_size / num_chunks = {chunk} samples per chunk must be divisible '
                             f'by the world size {world_size}')
        self.pooled = PooledStatistics(num_domains, decay=self.pool_decay, drift_z=self.drift_z)
        self._last_probed = np.full(num_domains, -1.0)
        self._restore_domains()

    def _restore_domains(self) -> None:
        if self._loaded is None or self.pooled is None:
            return
        self.pooled.load_state_dict(self._loaded['pooled'])
        self._last_probed = np.asarray(self._loaded['last_probed'], dtype=np.float64)
        self._loaded = None

    @property
    def log_weights(self) -> np.ndarray:
        """Log of the weights PiKE last scheduled (the loader holds them)."""
        assert self.mixture is not None
        with np.errstate(divide='ignore'):
            return np.log(self.mixture.latest_weights()[1])

    def domains_to_probe(self) -> np.ndarray:
        """Active domains this check probes: the ``domains_per_check`` least recently probed (ties: index)."""
        assert self.mixture is not None and self._last_probed is not None
        active = np.flatnonzero(self.mixture.planner.active)
        budget = self.domains_per_check or MAX_DOMAINS_PER_CHECK
        if (self._last_probed[active] < 0).all():  # the first check measures every domain at one time,
            return active  # so no domain's statistics start from an earlier, less trained model
        order = np.lexsort((active, self._last_probed[active]))
        return np.sort(active[order[:budget]])

    def _probe(self, state: State) -> tuple[GradientStatistics, np.ndarray, np.ndarray]:
        """Probe the domains due this check; returns their statistics, the domains and their probe losses."""
        assert self.mixture is not None
        domains = self.domains_to_probe()
        statistics, probe_losses = probe_gradients(
            state, self.mixture, domains, estimation_batch_size=self.estimation_batch_size,
            num_chunks=self.num_chunks, conflict_sketch_size=self.conflict_sketch_size,
            microbatch_size=self.probe_microbatch_size)
        return statistics, domains, probe_losses

    def _update(self, state: State, logger: Logger) -> None:
        """Pool the pending probe, take one update step, schedule the weights and log everything."""
        mixture, pooled = self.mixture, self.pooled
        assert mixture is not None and pooled is not None and self._pending is not None
        statistics, probed, probe_losses = self._pending
        self._pending = None
        grad, variance = statistics.grad_sq_norms.numpy(), statistics.per_sample_variances.numpy()
        chunk_norms = statistics.chunk_grad_sq_norms.numpy()
        finite = np.isfinite(grad) & np.isfinite(variance) & np.isfinite(probe_losses) & np.isfinite(
            chunk_norms).all(axis=1)
        probe_se = (np.full(len(probed), np.nan), np.full(len(probed), np.nan))
        if finite.any():  # a non-finite probe is never pooled: it would poison every later check
            elapsed = np.maximum(self.checks - self._last_probed[probed[finite]], 1.0)  # never probed: any
            pairs = {}
            if statistics.inner_products is not None:
                kept = np.ix_(finite, finite)
                pairs = {'inner_products': statistics.inner_products.numpy()[kept],
                         'inner_product_sketch_var': statistics.inner_product_sketch_var.numpy()[kept]}
            grad_se, variance_se = pooled.update(
                probed[finite], grad[finite], variance[finite], chunk_norms[finite], probe_losses[finite],
                num_chunks=statistics.num_chunks, chunk_size=statistics.chunk_size, checks_since_last_probe=elapsed,
                **pairs)
            probe_se[0][finite], probe_se[1][finite] = grad_se, variance_se
        self._last_probed[probed] = self.checks
        self.checks += 1
        self.probe_samples += len(probed) * self.estimation_batch_size
        mask = mixture.planner.active
        if finite.all():
            result, extra = self._step(state, mask)
        else:
            bad = [mixture.domain_names[k] for k in probed[~finite]]
            result, extra = self._skip(state, mask, f'non-finite statistics or probe loss for {bad} in this probe'), {}
        after_step = int(state.timestamp.batch) - 1
        if result.skipped:
            log.warning('PiKE: skipping the update after batch %d: %s', after_step, result.reason)
        else:
            effective = mixture.set_weights(result.weights, after_step=after_step)
            logger.log_metrics({'pike/effective_step': effective})
        self._log(logger, statistics, probed, probe_losses, probe_se, result, extra)

    def _step(self, state: State, mask: np.ndarray) -> tuple[PikeStep, dict[str, Any]]:
        """New weights from the pooled statistics by the selected ``update`` rule."""
        mixture, pooled = self.mixture, self.pooled
        assert mixture is not None and pooled is not None
        batch_size = mixture.planner.global_batch_size
        current = self.log_weights
        floor = self._floor(mask)
        cap = self._weight_cap(state)
        grad = np.where(mask, pooled.grad_sq_norms, 0.0)
        variance = np.where(mask, pooled.per_sample_variances, 0.0)
        unseen = np.flatnonzero(mask & ~pooled.seen)
        if unseen.size:
            names = [mixture.domain_names[k] for k in unseen]
            return self._skip(state, mask, f'domains {names} have not been probed yet'), {}
        with np.errstate(divide='ignore'):
            weights = np.exp(current)
        rho = auto_zeta_ratio(grad, variance, weights, batch_size=batch_size) if self.zeta_ratio == 'auto' \
            else float(self.zeta_ratio)
        extra: dict[str, Any] = {'zeta_ratio': rho}
        loss_weights = None
        if self.tau > 0:  # pooled losses are finite: non-finite probes are never pooled
            loss_weights = balanced_coefficients(np.where(mask, pooled.losses, 0.0), self.tau, active=mask)
        if self.update == 'paper':
            return pike_update(current, grad, variance, zeta1=self.zeta1, zeta2=self.zeta2, batch_size=batch_size,
                               loss_weights=loss_weights, active=mask, score_clip=self.score_clip,
                               min_weight=floor, max_weight=cap), extra
        if self.update == 'kkt':
            lr = float(state.optimizers[0].param_groups[0]['lr'])
            if self.smoothness != 'auto':
                smoothness = float(self.smoothness)
            else:  # L eta / beta = zeta_ratio; a learning rate of 0 takes no step (kkt_update skips)
                smoothness = rho * self.beta / lr if lr > 0 else 0.0
            return kkt_update(current, grad, variance, lr=lr, batch_size=batch_size, smoothness=smoothness,
                              beta=self.beta, gamma=self.gamma, active=mask, min_weight=floor, max_weight=cap), extra
        alignment = {'inner_products': pooled.inner_products, 'inner_product_var': pooled.inner_product_var} \
            if self.alignment else {}
        evidence = evidence_scores(
            grad, variance, np.where(mask, pooled.grad_sq_var, 0.0), np.where(mask, pooled.variance_var, 0.0),
            np.where(mask, pooled.covariance, 0.0), weights, batch_size=batch_size, zeta_ratio=rho,
            step_size=self.step_size, evidence_z=self.evidence_z,
            degrees_of_freedom=float(pooled.degrees_of_freedom[mask].min()), loss_weights=loss_weights, active=mask,
            **alignment)
        extra.update(advantage=evidence.advantage, advantage_se=evidence.advantage_se, critical_z=evidence.critical)
        if evidence.alignment is not None:
            extra.update(alignment=evidence.alignment, alignment_se=evidence.alignment_se)
        return apply_scores(current, evidence.scores, active=mask, score_clip=self.score_clip, min_weight=floor,
                            max_weight=cap, reason=evidence.reason), extra

    def _skip(self, state: State, mask: np.ndarray, reason: str) -> PikeStep:
        """No update: the current weights, only renormalised and projected."""
        current = self.log_weights
        return apply_scores(current, np.zeros(current.size), active=mask, score_clip=self.score_clip,
                            min_weight=self._floor(mask), max_weight=self._weight_cap(state), reason=reason)

    def _floor(self, mask: np.ndarray) -> float:
        assert self.mixture is not None
        return weight_floor(self.mixture, mask, self.min_weight)

    def _weight_cap(self, state: State) -> float | np.ndarray:
        assert self.mixture is not None
        return weight_cap(state, self.mixture, self.max_weight, self.max_epochs_per_domain)

    def _log(self, logger: Logger, statistics: GradientStatistics, probed: np.ndarray, probe_losses: np.ndarray,
             probe_se: tuple[np.ndarray, np.ndarray], result: PikeStep, extra: dict[str, Any]) -> None:
        mixture, pooled = self.mixture, self.pooled
        assert mixture is not None and pooled is not None
        names = mixture.domain_names
        counts = mixture.counts_at(mixture.latest_weights()[0])
        epochs = mixture.domain_epochs()
        metrics: dict[str, float] = {'pike/skipped': float(result.skipped), 'pike/checks': float(self.checks),
                                     'pike/probe_samples': float(self.probe_samples),
                                     'pike/probed_domains': float(len(probed))}
        for key in ('zeta_ratio', 'critical_z'):
            if key in extra:
                metrics[f'pike/{key}'] = float(extra[key])
        if self.update == 'paper':
            metrics.update({'pike/zeta1': float(self.zeta1), 'pike/zeta2': float(self.zeta2)})
        for k, name in enumerate(names):
            metrics[f'pike/weight/{name}'] = float(result.weights[k])
            metrics[f'pike/batch_count/{name}'] = float(counts[k])
            metrics[f'pike/epochs/{name}'] = float(epochs[k])
            metrics[f'pike/score/{name}'] = float(result.scores[k])
        grad_se, variance_se = probe_se
        for j, k in enumerate(probed):
            name = names[k]
            metrics[f'pike/grad_sq_norm/{name}'] = float(statistics.grad_sq_norms[j])
            metrics[f'pike/grad_sq_norm_se/{name}'] = float(grad_se[j])
            metrics[f'pike/variance/{name}'] = float(statistics.per_sample_variances[j])
            metrics[f'pike/variance_se/{name}'] = float(variance_se[j])
            if np.isfinite(pooled.last_drift[k]):  # from the domain's second probe on
                metrics[f'pike/drift_z/{name}'] = float(pooled.last_drift[k])
            metrics[f'pike/probe_loss/{name}'] = float(probe_losses[j])
        grad, variance = pooled.grad_sq_norms, pooled.per_sample_variances
        pooled_values = {'grad_sq_norm': grad, 'grad_sq_norm_se': np.sqrt(pooled.grad_sq_var),
                         'variance': variance, 'variance_se': np.sqrt(pooled.variance_var),
                         'samples': pooled.effective_samples, 'probe_loss': pooled.losses}
        with np.errstate(divide='ignore', invalid='ignore'):
            noise_scale = np.where(grad > 0, variance / grad, np.nan)
            noise_dim = np.where(pooled.noise_shape > 0, 1.0 / pooled.noise_shape, np.nan)
        for k in np.flatnonzero(pooled.seen):
            name = names[k]
            for kind, values in pooled_values.items():
                metrics[f'pike/pooled/{kind}/{name}'] = float(values[k])
            metrics[f'pike/noise_scale/{name}'] = float(noise_scale[k])
            metrics[f'pike/noise_dim/{name}'] = float(noise_dim[k])
            for key in ('advantage', 'advantage_se', 'alignment', 'alignment_se'):
                if key in extra:
                    metrics[f'pike/{key}/{name}'] = float(extra[key][k])
        seen = pooled.pairs_seen
        inner, inner_se = pooled.inner_products, np.sqrt(pooled.inner_product_var)
        for j, k in zip(*np.nonzero(np.triu(seen))):
            metrics[f'pike/pooled/inner_product/{names[j]}/{names[k]}'] = float(inner[j, k])
            metrics[f'pike/pooled/inner_product_se/{names[j]}/{names[k]}'] = float(inner_se[j, k])
        if statistics.inner_products is not None and len(probed) > 1:
            metrics.update(self._conflicts(statistics, probed))
        logger.log_metrics(metrics)

    def _conflicts(self, statistics: GradientStatistics, probed: np.ndarray) -> dict[str, float]:
        """Pairwise gradient cosines with standard errors; warns when an interval lies below the threshold."""
        mixture, pooled = self.mixture, self.pooled
        assert mixture is not None and pooled is not None
        cosines, se = cosine_intervals(
            statistics.inner_products.numpy(), statistics.inner_product_sketch_var.numpy(),
            pooled.grad_sq_norms[probed], pooled.grad_sq_var[probed], pooled.per_sample_variances[probed],
            pooled.noise_shape[probed], num_chunks=statistics.num_chunks, chunk_size=statistics.chunk_size)
        metrics, conflicts = conflict_report([mixture.domain_names[k] for k in probed], cosines, se,
                                             self.conflict_threshold)
        for message in conflicts:
            log.warning('PiKE: %s; PiKE assumes low conflict', message)
        return metrics
