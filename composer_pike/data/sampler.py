"""The batch sampler: planned global batches, this rank's slice, and the snapshots that make them resumable."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from torch.utils.data.distributed import DistributedSampler

from composer_pike.data.dataset import MixtureDataset
from composer_pike.data.prefetch import ShardPrefetcher
from composer_pike.data.planner import MixturePlanner, PlannedBatch


class MixtureBatchSampler(DistributedSampler):
    """Yields this rank's list of ``(domain, index)`` for each planned global batch.

    ``consumed`` counts batches the trainer has received (maintained by :class:`MixtureDataLoader`).
    A new iteration first rewinds the planner to ``consumed``: batches planned ahead for an
    iterator that was abandoned are planned again, identically, instead of being skipped.
    """

    def __init__(self, dataset: MixtureDataset, planner: MixturePlanner, *, rank: int, world_size: int,
                 steps_per_epoch: int, delay: int, prefetch_steps: int) -> None:
        # A DistributedSampler only in type: Composer refuses multi-rank loaders whose sampler is not one.
        DistributedSampler.__init__(self, dataset, num_replicas=world_size, rank=rank, shuffle=False)
        if planner.global_batch_size % world_size:
            raise ValueError(f'global batch size {planner.global_batch_size} is not divisible by '
                             f'world size {world_size}')
        self.planner = planner
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch
        self.delay = delay
        self.consumed = 0
        self._snapshots: dict[int, dict[str, Any]] = {}
        self.prefetcher = ShardPrefetcher(dataset, prefetch_steps) if prefetch_steps > 0 else None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self._rewind()
        epoch_end = (self.consumed // self.steps_per_epoch + 1) * self.steps_per_epoch
        try:
            while self.planner.step < epoch_end:
                self._snapshots[self.planner.step] = self.planner.state_dict(include_schedule=False)
                batch = self.planner.plan_next()
                if batch is None:
                    return
                if self.prefetcher is not None:
                    counts = np.bincount(batch.domains, minlength=self.planner.num_domains)
                    self.prefetcher.after_plan(self.planner, counts)
                yield self._rank_items(batch)
        finally:
            # The loader stopped reading (end of pass, end of run, or an abandoned iterator): shards
            # queued for steps that may never come are dropped, and the next pass asks again.
            if self.prefetcher is not None:
                self.prefetcher.cancel_queued()

    def _rank_items(self, batch: PlannedBatch) -> list[tuple[int, int]]:
        domains, indices = batch.rank_slice(self.rank, self.world_size)
        return list(zip(domains.tolist(), indices.tolist()))

    def mark_consumed(self) -> None:
        self._snapshots.pop(self.consumed - 1, None)
        self.consumed += 1
        self.planner.forget_schedule_before(self.consumed)

    def position(self) -> dict[str, Any]:
        """Planner state before the next batch the trainer will take, with the current schedule."""
        state = self._snapshots.get(self.consumed)
        if state is None:
            if self.planner.step != self.consumed:
                raise RuntimeError(f'no planner snapshot for step {self.consumed} (planned up to {self.planner.step})')
            state = self.planner.state_dict(include_schedule=False)
        return dict(state, schedule=self.planner.state_dict()['schedule'])

    def _rewind(self) -> None:
        if self.planner.step != self.consumed:
            self.planner.load_state_dict(self.position())
        self._snapshots.clear()

    def restore(self, planner_state: dict[str, Any], consumed: int) -> None:
        self.planner.load_state_dict(planner_state)
        self.consumed = consumed
        self._snapshots.clear()
