"""The DataLoader over a MixtureDataset, and the one function that wires dataset, planner, sampler and loader."""
from __future__ import annotations

import logging
import sys
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from composer_pike.data.dataset import MixtureDataset, collate_samples
from composer_pike.data.sampler import MixtureBatchSampler
from composer_pike.data.planner import MixturePlanner
from composer_pike.data.probe_order import ProbeOrder

log = logging.getLogger(__name__)

ENDED_BUT_ASKED_AGAIN = (
    "the mixture has ended (on_exhausted={policy!r}) and a second pass over the loader found nothing to "
    'yield, and no Composer Trainer was found driving it to stop. Stop the loop at '
    'MixtureDataset.finished, or set the run length within the data')


class MixtureDataLoader(DataLoader):
    """A DataLoader over a :class:`MixtureDataset` that tells the sampler which batches were taken.

    When the mixture ends (``on_exhausted='stop'``, or ``'drop'`` once no domain of positive weight is
    left), the pass that yielded its last batch ends and the Composer Trainer iterating the loader
    (plain Composer, llm-foundry, ``composer_pike.train``) is told to stop (``State.stop_training``):
    training ends cleanly at the last batch, whoever built the Trainer and whatever callbacks it has,
    instead of starting empty epochs for ever. A caller
    that is not a Trainer sees one empty pass, and a second one raises :data:`ENDED_BUT_ASKED_AGAIN`.
    """

    _empty_passes = 0

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank (Composer reads it to default the microbatch size)."""
        sampler: MixtureBatchSampler = self.batch_sampler  # type: ignore[assignment]
        return sampler.planner.global_batch_size // sampler.world_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        """DataLoader.__init__ stores None here when a batch sampler is given; the sampler decides."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler: MixtureBatchSampler = self.batch_sampler  # type: ignore[assignment]
        if self._empty_passes and self.dataset.finished:
            raise RuntimeError(ENDED_BUT_ASKED_AGAIN.format(policy=sampler.planner.on_exhausted))
        yielded = False
        for batch in super().__iter__():
            sampler.mark_consumed()
            yielded = True
            yield batch
        self._empty_passes = 0 if yielded else self._empty_passes + 1
        if self.dataset.finished:
            stop_driving_trainer(sys._getframe(1), sampler.planner.on_exhausted)


def stop_driving_trainer(frame: Any, policy: str) -> None:
    """Stop the Composer Trainer whose training loop is iterating this loader, if one is.

    A DataLoader has no reference to the Trainer that iterates it. The caller frames do: Composer's
    ``Trainer._iter_dataloader`` (a method, so ``self`` is the Trainer) is the frame that asked for
    the next batch, a few frames out at most (itertools.islice adds none).
    """
    from composer import Trainer
    for _ in range(4):
        if frame is None:
            break
        owner = frame.f_locals.get('self')
        if isinstance(owner, Trainer):
            if owner.state.timestamp < owner.state.max_duration:
                log.info('the mixture has ended (on_exhausted=%s) at batch %d: stopping training',
                         policy, int(owner.state.timestamp.batch))
                owner.state.stop_training()
            return
        frame = frame.f_back


def loader_lookahead(num_workers: int, prefetch_factor: int | None) -> int:
    """Batches a torch DataLoader plans before the trainer asks for them."""
    return num_workers * (prefetch_factor or 2) if num_workers > 0 else 0


def build_mixture_dataloader(
    dataset: MixtureDataset,
    global_batch_size: int,
    *,
    weights: Sequence[float] | None = None,
    batching: str = 'mix',
    on_exhausted: str = 'repeat',
    seed: int = 0,
    shuffle: bool = True,
    shuffle_block_shards: int = 4,
    steps_per_epoch: int | None = None,
    delay: int | None = None,
    num_workers: int = 2,
    prefetch_factor: int | None = 2,
    prefetch_steps: int = 8,
    pin_memory: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> MixtureDataLoader:
    """Wire a :class:`MixtureDataset` to a planner, sampler and DataLoader for this rank.

    Args:
        global_batch_size: samples per optimizer step over all ranks (divisible by world size).
        steps_per_epoch: batches per Composer epoch; default: total train samples // batch.
        delay: weights set after step t take effect at step t + 1 + delay (the effective-step rule of
            :mod:`composer_pike.data`); default and minimum: the look-ahead, num_workers x prefetch_factor.
        prefetch_steps: remote shards needed within this many steps are downloaded in advance.
        rank / world_size: default from ``composer.utils.dist``.
    """
    from composer.utils import dist

    rank = dist.get_global_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    lookahead = loader_lookahead(num_workers, prefetch_factor)
    delay = lookahead if delay is None else int(delay)
    if delay < lookahead:
        raise ValueError(f'delay={delay} is smaller than the loader look-ahead of {lookahead} batches '
                         f'(num_workers={num_workers} x prefetch_factor={prefetch_factor}); weight changes '
                         'would reach batches already planned')
    planner = MixturePlanner(
        dataset.domain_sizes,
        global_batch_size,
        weights=weights,
        batching=batching,
        on_exhausted=on_exhausted,
        seed=seed,
        shard_sizes=dataset.shard_sizes,
        shuffle=shuffle,
        shuffle_block_shards=shuffle_block_shards,
    )
    steps_per_epoch = steps_per_epoch or max(1, len(dataset) // global_batch_size)
    sampler = MixtureBatchSampler(dataset, planner, rank=rank, world_size=world_size,
                                  steps_per_epoch=steps_per_epoch, delay=delay, prefetch_steps=prefetch_steps)
    dataset.sampler = sampler
    dataset.probe_order = ProbeOrder(dataset.domain_sizes, seed)
    return MixtureDataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=dataset.reset_object_store_clients if num_workers > 0 else None,
    )
