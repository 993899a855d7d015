"""The PiKE Composer algorithm: glue between Composer events, gradient statistics and the mixture loader.

Every ``check_interval`` steps, at BEFORE_TRAIN_BATCH (whose gradients the trainer's own
``zero_grad`` wipes right after), the algorithm runs ``num_chunks`` chunk micro-batches of every
domain through the model and turns the chunk gradients into G_k and sigma_k^2
(:mod:`composer_pike.stats`). At BATCH_END it applies one PiKE step (:mod:`composer_pike.weights`)
and schedules the new weights on the loader, which uses them from step ``t + 1 + delay``.

The weights themselves live in the loader's schedule, which Composer checkpoints with the dataset
state; the algorithm's own state is only the zeta constants and the check count (fixed shape, so
it also survives sharded checkpoints).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from torch.nn.parallel import DistributedDataParallel

from composer_pike.data import MixtureDataset
from composer_pike.stats import GradientStatistics, GradientStatsAccumulator, gradient_layout, gradient_sum_factor
from composer_pike.weights import (
    balanced_coefficients,
    calibrate_zeta,
    epoch_cap_upper_bounds,
    pike_update,
)

log = logging.getLogger(__name__)
CALIBRATIONS = ('every_check', 'first_check')  # when calibrated zetas are chosen


def find_mixture(state: State) -> MixtureDataset:
    """The :class:`MixtureDataset` behind the trainer's train dataloader, or a clear error."""
    dataloader = state.train_dataloader
    dataset = getattr(dataloader, 'dataset', None)
    if not isinstance(dataset, MixtureDataset):
        raise TypeError('PiKE needs the train dataloader from composer_pike.data.build_mixture_dataloader '
                        f'(a MixtureDataset); got a {type(dataloader).__name__} over {type(dataset).__name__}')
    if dataset.sampler is None:
        raise TypeError('the MixtureDataset is not attached to a loader; use build_mixture_dataloader')
    return dataset


class PiKE(Algorithm):
    """PiKE adaptive data mixing (Li et al., arXiv 2502.06244), Balanced-PiKE with ``tau > 0``.

    Args:
        check_interval: optimizer steps between weight updates (the paper's T0).
        estimation_batch_size: samples per domain per check, over all ranks; split into
            ``num_chunks`` chunks of ``estimation_batch_size / num_chunks`` samples.
        num_chunks: chunks M per domain (>= 2; >= 8 keeps the variance estimate's relative
            standard error near sqrt(2/(M-1))).
        zeta1, zeta2: step sizes of the G and sigma^2 terms. ``None`` (default) calibrates them
            from the statistics so the largest score equals ``target_step`` nats, with
            ``zeta2 = zeta_ratio * zeta1``.
        calibration: when calibrated zetas are chosen: ``'every_check'`` (default) or
            ``'first_check'`` (then kept). Gradients at initialisation are tens of times larger
            than a few hundred steps later, so zetas fixed at the first check shrink every later
            update to a few hundredths of a nat and the weights stop moving; chosen at every check,
            each update moves the most-changed log-weight by ``target_step`` (a normalised
            mirror-descent step: the statistics set the direction, ``target_step`` the size).
        target_step: nats of log-weight change of the largest score at calibration.
        zeta_ratio: zeta2 / zeta1 when calibrating.
        score_clip: per-check cap on |log-weight change| (nats).
        min_weight: floor on every active weight (default 0.05 / K_active).
        max_weight: cap on every weight.
        tau: Balanced-PiKE temperature of the tilted objective (0 = plain PiKE; the paper's best: 3).
        max_epochs_per_domain: optional cap on passes over each domain for the whole run, folded
            into the weight cap (needs ``max_duration`` in ba, sp, tok or ep).
        conflict_threshold: warn when an estimated cosine between two domains' gradients falls
            below this (PiKE assumes low gradient conflict).
        conflict_sketch_size: coordinates sampled per domain for the conflict monitor (0 = off).
        probe_microbatch_size: per-rank samples per probe forward/backward; default: the trainer's
            device_train_microbatch_size (or the whole per-rank chunk).
    """

    def __init__(
        self,
        check_interval: int = 1000,
        estimation_batch_size: int = 256,
        num_chunks: int = 8,
        zeta1: float | None = None,
        zeta2: float | None = None,
        target_step: float = 0.3,
        zeta_ratio: float = 1.0,
        calibration: str = 'every_check',
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
        if num_chunks < 2:
            raise ValueError(f'num_chunks must be >= 2 (the variance estimate needs two chunks), got {num_chunks}')
        if estimation_batch_size < num_chunks or estimation_batch_size % num_chunks:
            raise ValueError(f'estimation_batch_size ({estimation_batch_size}) must be a positive multiple of '
                             f'num_chunks ({num_chunks})')
        for name, value in (('zeta1', zeta1), ('zeta2', zeta2)):
            if value is not None and not value > 0:
                raise ValueError(f'{name} must be > 0, got {value}')
        if (zeta1 is None) != (zeta2 is None):
            raise ValueError('set both zeta1 and zeta2, or neither (then they are calibrated)')
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
        if not target_step > 0 or not zeta_ratio > 0 or not score_clip > 0:
            raise ValueError('target_step, zeta_ratio and score_clip must be > 0')
        if tau < 0:
            raise ValueError(f'tau must be >= 0, got {tau}')
        if max_epochs_per_domain is not None and not max_epochs_per_domain > 0:
            raise ValueError(f'max_epochs_per_domain must be > 0, got {max_epochs_per_domain}')
        self.check_interval = check_interval
        self.estimation_batch_size = estimation_batch_size
        self.num_chunks = num_chunks
        self.zeta1 = zeta1
        self.zeta2 = zeta2
        self.target_step = target_step
        self.zeta_ratio = zeta_ratio
        self.calibration = calibration
        self._zeta_given = zeta1 is not None
        self.score_clip = score_clip
        self.min_weight = min_weight
        self.max_weight = max_weight
        self.tau = tau
        self.max_epochs_per_domain = max_epochs_per_domain
        self.conflict_threshold = conflict_threshold
        self.conflict_sketch_size = conflict_sketch_size
        self.probe_microbatch_size = probe_microbatch_size
        self.checks = 0
        self.mixture: MixtureDataset | None = None
        self._pending: tuple[GradientStatistics, np.ndarray, np.ndarray] | None = None

    # ---- Composer wiring ---------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event == Event.FIT_START:
            return True
        if self.mixture is None or self.mixture.num_domains < 2:
            return False
        if event == Event.BEFORE_TRAIN_BATCH:
            return int(state.timestamp.batch) % self.check_interval == 0
        return event == Event.BATCH_END and self._pending is not None

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._attach(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._pending = self._probe(state)
        else:
            self._update(state, logger)

    def state_dict(self) -> dict[str, Any]:
        return {
            'zeta1': math.nan if self.zeta1 is None else float(self.zeta1),
            'zeta2': math.nan if self.zeta2 is None else float(self.zeta2),
            'checks': int(self.checks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.zeta1 = None if math.isnan(state['zeta1']) else float(state['zeta1'])
        self.zeta2 = None if math.isnan(state['zeta2']) else float(state['zeta2'])
        self.checks = int(state['checks'])

    # ---- steps -------------------------------------------------------------------------------

    def _attach(self, state: State) -> None:
        self.mixture = find_mixture(state)
        if self.mixture.num_domains < 2:
            warnings.warn(f'PiKE has nothing to mix: the loader has one domain ({self.mixture.domain_names[0]})')
            return
        world_size = dist.get_world_size()
        chunk = self.estimation_batch_size // self.num_chunks
        if chunk % world_size:
            raise ValueError(f'estimation_batch_size / num_chunks = {chunk} samples per chunk must be divisible '
                             f'by the world size {world_size}')

    @property
    def log_weights(self) -> np.ndarray:
        """Log of the weights PiKE last scheduled (the loader's schedule holds the weights)."""
        assert self.mixture is not None
        with np.errstate(divide='ignore'):
            return np.log(self.mixture.planner.schedule[-1][1])

    def _probe(self, state: State) -> tuple[GradientStatistics, np.ndarray, np.ndarray]:
        """Run the probe without consuming the global RNG (dropout), so training is unchanged."""
        device = state.device._device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == 'cuda' else []
        with torch.random.fork_rng(devices=devices):
            return self._probe_passes(state)

    def _probe_passes(self, state: State) -> tuple[GradientStatistics, np.ndarray, np.ndarray]:
        """Chunk forward/backward passes for every active domain; returns statistics and probe losses."""
        mixture = self.mixture
        assert mixture is not None
        model = state.model
        loss_owner = model.module if isinstance(model, DistributedDataParallel) else model
        active = np.flatnonzero(mixture.planner.active)
        rank, world_size = dist.get_global_rank(), dist.get_world_size()
        chunk_size = self.estimation_batch_size // self.num_chunks
        rank_chunk = chunk_size // world_size
        micro = self.probe_microbatch_size or _device_microbatch(state) or rank_chunk
        loss_scale = 1.0 / gradient_sum_factor(model)
        params = [p for p in model.parameters() if p.requires_grad]
        accumulator = GradientStatsAccumulator(
            params, len(active), chunk_size=chunk_size, conflict_sketch_size=self.conflict_sketch_size,
            seed=int(state.timestamp.batch), layout=gradient_layout(model))
        loss_sums = torch.zeros(len(active), dtype=torch.float64)
        for slot, domain in enumerate(active):
            batch = mixture.probe_batch(int(domain), self.estimation_batch_size, self.num_chunks, rank, world_size)
            batch = state.device.batch_to_device(batch)
            accumulator.begin_domain(slot)
            for start in range(0, self.estimation_batch_size // world_size, rank_chunk):
                model.zero_grad(set_to_none=True)
                for micro_start in range(start, start + rank_chunk, micro):
                    rows = {key: value[micro_start:min(micro_start + micro, start + rank_chunk)]
                            for key, value in batch.items()}
                    with get_precision_context(state.precision, state.precision_config):
                        outputs = model(rows)
                        loss = loss_owner.loss(outputs, rows)
                    share = len(rows['input_ids']) / rank_chunk
                    (loss * share * loss_scale).backward()
                    loss_sums[slot] += float(loss.detach()) * share
                accumulator.add_chunk()
            accumulator.end_domain()
        model.zero_grad(set_to_none=True)
        statistics = accumulator.finalize()
        probe_losses = loss_sums / self.num_chunks
        if world_size > 1:
            probe_losses = probe_losses.to(state.device._device)
            dist.all_reduce(probe_losses)
            probe_losses = probe_losses.cpu() / world_size
        return statistics, active, probe_losses.numpy()

    def _update(self, state: State, logger: Logger) -> None:
        """One PiKE step from the pending probe; schedule the weights and log everything."""
        mixture = self.mixture
        assert mixture is not None and self._pending is not None
        statistics, active, probe_losses = self._pending
        self._pending = None
        num_domains = mixture.num_domains
        grad_sq = np.full(num_domains, np.nan)
        variance = np.full(num_domains, np.nan)
        losses = np.full(num_domains, np.nan)
        grad_sq[active] = statistics.grad_sq_norms.numpy()
        variance[active] = statistics.per_sample_variances.numpy()
        losses[active] = probe_losses
        mask = mixture.planner.active
        batch_size = mixture.planner.global_batch_size
        loss_weights = None
        if self.tau > 0:
            loss_weights = np.zeros(num_domains)
            # a non-finite probe loss is reported by pike_update's skip logic, not raised here
            loss_weights[active] = balanced_coefficients(probe_losses, self.tau) \
                if np.all(np.isfinite(probe_losses)) else np.nan
        if not self._zeta_given and (self.zeta1 is None or self.calibration == 'every_check'):
            try:
                self.zeta1, self.zeta2 = calibrate_zeta(
                    np.where(mask, grad_sq, 0.0), np.where(mask, variance, 0.0), batch_size=batch_size,
                    target_step=self.target_step, zeta_ratio=self.zeta_ratio, loss_weights=loss_weights)
            except ValueError as error:
                log.warning('PiKE: skipping the check at batch %d: %s', int(state.timestamp.batch) - 1, error)
                self._log(logger, statistics, active, grad_sq, variance, losses,
                          mixture.weights_at(mixture.planner.schedule[-1][0]), skipped=True)
                return
        result = pike_update(
            self.log_weights, np.where(mask, grad_sq, 0.0), np.where(mask, variance, 0.0),
            zeta1=self.zeta1, zeta2=self.zeta2, batch_size=batch_size, loss_weights=loss_weights, active=mask,
            score_clip=self.score_clip, min_weight=self.min_weight, max_weight=self._weight_cap(state))
        self.checks += 1
        after_step = int(state.timestamp.batch) - 1
        if result.skipped:
            log.warning('PiKE: skipping the update after batch %d: %s', after_step, result.reason)
        else:
            effective = mixture.set_weights(result.weights, after_step=after_step)
            logger.log_metrics({'pike/effective_step': effective})
        self._log(logger, statistics, active, grad_sq, variance, losses, result.weights, result.skipped)

    def _weight_cap(self, state: State) -> float | np.ndarray:
        """``max_weight``, tightened per domain by ``max_epochs_per_domain`` when set."""
        if self.max_epochs_per_domain is None:
            return self.max_weight
        mixture = self.mixture
        assert mixture is not None
        remaining = _samples_remaining(state, mixture)
        consumed = mixture.domain_epochs() * mixture.domain_sizes
        caps = epoch_cap_upper_bounds(mixture.domain_sizes, remaining, self.max_epochs_per_domain,
                                      samples_consumed=consumed)
        return np.minimum(caps, self.max_weight)

    def _log(self, logger: Logger, statistics: GradientStatistics, active: np.ndarray, grad_sq: np.ndarray,
             variance: np.ndarray, losses: np.ndarray, weights: np.ndarray, skipped: bool) -> None:
        mixture = self.mixture
        assert mixture is not None
        names = mixture.domain_names
        counts = mixture.counts_at(mixture.planner.schedule[-1][0])
        epochs = mixture.domain_epochs()
        metrics: dict[str, float] = {'pike/zeta1': math.nan if self.zeta1 is None else float(self.zeta1),
                                     'pike/zeta2': math.nan if self.zeta2 is None else float(self.zeta2),
                                     'pike/skipped': float(skipped), 'pike/checks': float(self.checks)}
        for k, name in enumerate(names):
            metrics[f'pike/weight/{name}'] = float(weights[k])
            metrics[f'pike/batch_count/{name}'] = float(counts[k])
            metrics[f'pike/epochs/{name}'] = float(epochs[k])
        noise_scale = statistics.noise_scale().numpy()
        for j, k in enumerate(active):
            name = names[k]
            metrics[f'pike/grad_sq_norm/{name}'] = float(grad_sq[k])
            metrics[f'pike/variance/{name}'] = float(variance[k])
            metrics[f'pike/probe_loss/{name}'] = float(losses[k])
            metrics[f'pike/noise_scale/{name}'] = float(noise_scale[j])
        if statistics.cosines is not None:
            cosines = statistics.cosines.numpy()
            lowest = np.inf
            for i in range(len(active)):
                for j in range(i + 1, len(active)):
                    a, b = names[active[i]], names[active[j]]
                    metrics[f'pike/cosine/{a}/{b}'] = float(cosines[i, j])
                    if np.isfinite(cosines[i, j]) and cosines[i, j] < lowest:
                        lowest = float(cosines[i, j])
                    if cosines[i, j] < self.conflict_threshold:
                        log.warning("PiKE: gradients of '%s' and '%s' conflict (cosine %.3f < %.3f); PiKE assumes "
                                    'low conflict', a, b, cosines[i, j], self.conflict_threshold)
            if np.isfinite(lowest):
                metrics['pike/min_cosine'] = lowest
        logger.log_metrics(metrics)


def _device_microbatch(state: State) -> int | None:
    size = getattr(state, 'device_train_microbatch_size', None)
    return size if isinstance(size, int) and size > 0 else None


def _samples_remaining(state: State, mixture: MixtureDataset) -> float:
    """Global training samples left until ``max_duration`` (for the per-domain epoch cap)."""
    duration = state.max_duration
    if duration is None:
        raise ValueError('max_epochs_per_domain needs the trainer max_duration')
    batch = mixture.planner.global_batch_size
    now = state.timestamp
    if duration.unit == TimeUnit.BATCH:
        return float((duration.value - now.batch.value) * batch)
    if duration.unit == TimeUnit.SAMPLE:
        return float(duration.value - now.sample.value)
    if duration.unit == TimeUnit.TOKEN:
        return float(duration.value - now.token.value) / mixture.seq_len
    if duration.unit == TimeUnit.EPOCH:
        steps_per_epoch = len(mixture.sampler)
        return float(duration.value * steps_per_epoch - now.batch.value) * batch
    raise ValueError(f'max_epochs_per_domain cannot use max_duration in {duration.unit}')

