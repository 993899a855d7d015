"""What every adaptive algorithm here shares: finding the mixture loader behind the trainer, the
options of an evidence-driven step, and the floor and cap that bound each check's weights."""
from __future__ import annotations

import numpy as np
from composer.core import State, TimeUnit

from composer_pike.data import MixtureDataset
from composer_pike.weights import default_min_weight, epoch_cap_upper_bounds


def find_mixture(state: State, algorithm: str) -> MixtureDataset:
    """The :class:`MixtureDataset` behind the trainer's train dataloader, or an error naming ``algorithm``."""
    dataloader = state.train_dataloader
    dataset = getattr(dataloader, 'dataset', None)
    if not isinstance(dataset, MixtureDataset):
        raise TypeError(f'{algorithm} needs the train dataloader from composer_pike.data.build_mixture_dataloader '
                        f'(a MixtureDataset); got a {type(dataloader).__name__} over {type(dataset).__name__}')
    if dataset.sampler is None:
        raise TypeError('the MixtureDataset is not attached to a loader; use build_mixture_dataloader')
    return dataset


def check_step_options(*, step_size: float, evidence_z: float, score_clip: float, tau: float,
                       max_epochs_per_domain: float | None) -> None:
    """The options every adaptive algorithm here shares (evidence-driven steps within floor and cap)."""
    for name, value in (('step_size', step_size), ('score_clip', score_clip)):
        if not value > 0:
            raise ValueError(f'{name} must be > 0, got {value}')
    if not evidence_z >= 0:
        raise ValueError(f'evidence_z must be >= 0, got {evidence_z}')
    if tau < 0:
        raise ValueError(f'tau must be >= 0, got {tau}')
    if max_epochs_per_domain is not None and not max_epochs_per_domain > 0:
        raise ValueError(f'max_epochs_per_domain must be > 0, got {max_epochs_per_domain}')


def weight_floor(mixture: MixtureDataset, mask: np.ndarray, min_weight: float | None) -> float:
    """``min_weight``, by default one sample per batch (see :func:`default_min_weight`)."""
    if min_weight is not None:
        return min_weight
    return default_min_weight(int(np.count_nonzero(mask)), mixture.planner.global_batch_size)


def weight_cap(state: State, mixture: MixtureDataset, max_weight: float,
               max_epochs_per_domain: float | None) -> float | np.ndarray:
    """``max_weight``, tightened per domain by ``max_epochs_per_domain`` when set."""
    if max_epochs_per_domain is None:
        return max_weight
    remaining = _samples_remaining(state, mixture)
    consumed = mixture.domain_epochs() * mixture.domain_sizes
    caps = epoch_cap_upper_bounds(mixture.domain_sizes, remaining, max_epochs_per_domain, samples_consumed=consumed)
    return np.minimum(caps, max_weight)


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

