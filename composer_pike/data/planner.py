"""Deterministic planning of mixture batches: which sample of which domain goes into each global batch.

The planner is pure numpy and holds no data. Every global batch is a function of
(seed, domain sizes, weight schedule, step) and of the per-domain cursors that earlier steps left
behind, so every rank computes the same plan without communication, and a snapshot of
(step, cursors, epochs, active set, schedule) resumes it exactly.

Units: ``global_batch_size`` and all counts are in samples (one sample = one packed sequence);
steps are optimizer steps (global batches), 0-based.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from composer_pike.weights import apportion

BATCHING_METHODS = ('mix', 'random', 'round_robin')
EXHAUSTION_POLICIES = ('repeat', 'drop', 'stop')


def validate_weights(weights: Sequence[float] | np.ndarray, num_domains: int) -> np.ndarray:
    """Check that ``weights`` is a finite, non-negative, non-zero vector of length ``num_domains``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (num_domains,):
        raise ValueError(f'weights must have one entry per domain ({num_domains}), got shape {w.shape}')
    if not np.all(np.isfinite(w)):
        raise ValueError(f'weights must be finite, got {w.tolist()}')
    if np.any(w < 0):
        raise ValueError(f'weights must be non-negative, got {w.tolist()}')
    if w.sum() <= 0:
        raise ValueError(f'weights must have a positive sum, got {w.tolist()}')
    return w / w.sum()


def shard_block_order(shard_sizes: Sequence[int], rng: np.random.Generator, block_shards: int) -> np.ndarray:
    """A shuffled order of all sample ids that keeps shard locality.

    Shards are permuted, grouped into blocks of ``block_shards`` consecutive (permuted) shards, and
    the samples within each block are permuted. A reader therefore touches about ``block_shards``
    shards at a time, which keeps downloads from an object store sequential-ish and the local
    cache small, while still mixing samples across shards.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    shard_perm = rng.permutation(len(sizes))
    ids = np.concatenate([np.arange(starts[s], starts[s] + sizes[s]) for s in shard_perm]) if len(sizes) else \
        np.zeros(0, np.int64)
    block_bounds = np.cumsum(sizes[shard_perm])[block_shards - 1::block_shards]
    for lo, hi in zip(np.concatenate(([0], block_bounds)), np.concatenate((block_bounds, [len(ids)]))):
        if hi - lo > 1:
            ids[lo:hi] = ids[lo:hi][rng.permutation(hi - lo)]
    return ids


@dataclass
class PlannedBatch:
    """One global batch: ``domains[j]`` and ``indices[j]`` name sample j, sorted by domain."""
    step: int
    domains: np.ndarray
    indices: np.ndarray

    def rank_slice(self, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The contiguous part of the (domain-sorted) global batch that ``rank`` trains on."""
        per_rank = len(self.domains) // world_size
        lo = rank * per_rank
        return self.domains[lo:lo + per_rank], self.indices[lo:lo + per_rank]


class MixturePlanner:
    """Plans global batches over K domains with weights that may change at scheduled steps.

    Args:
        domain_sizes: samples per domain (train split).
        global_batch_size: samples per optimizer step, over all ranks.
        weights: initial mixing weights (normalised; uniform when ``None``).
        batching: ``'mix'`` (every batch holds round(B w_k) samples of every domain, largest
            remainder), ``'random'`` (the whole batch from one domain drawn with probability w) or
            ``'round_robin'`` (whole batches from each active domain in turn).
        on_exhausted: what happens when a domain has been read once: ``'repeat'`` (start its next
            pass, reshuffled), ``'drop'`` (the domain becomes inactive and the others are
            renormalised; planning ends when no domain of positive weight is left) or ``'stop'``
            (planning ends before the first batch that would need a second pass of any domain).
        seed: shuffling and random-batching seed.
        shard_sizes: samples per shard for each domain; used for locality-preserving shuffles.
        shuffle: shuffle each domain's pass (otherwise read in storage order).
        shuffle_block_shards: shards per shuffle block (see :func:`shard_block_order`).
        min_per_domain: in ``'mix'``, every domain with positive weight gets at least this many
            samples per batch when the batch has room for it.
    """

    def __init__(
        self,
        domain_sizes: Sequence[int],
        global_batch_size: int,
        *,
        weights: Sequence[float] | None = None,
        batching: str = 'mix',
        on_exhausted: str = 'repeat',
        seed: int = 0,
        shard_sizes: Sequence[Sequence[int]] | None = None,
        shuffle: bool = True,
        shuffle_block_shards: int = 4,
        min_per_domain: int = 1,
    ) -> None:
        self.domain_sizes = np.asarray(domain_sizes, dtype=np.int64)
        num_domains = len(self.domain_sizes)
        if num_domains < 1:
            raise ValueError('a mixture needs at least one domain')
        if np.any(self.domain_sizes < 1):
            empty = np.flatnonzero(self.domain_sizes < 1).tolist()
            raise ValueError(f'domains {empty} have no samples')
        if global_batch_size < 1:
            raise ValueError(f'global_batch_size must be >= 1, got {global_batch_size}')
        if batching not in BATCHING_METHODS:
            raise ValueError(f'batching must be one of {BATCHING_METHODS}, got {batching!r}')
        if on_exhausted not in EXHAUSTION_POLICIES:
            raise ValueError(f'on_exhausted must be one of {EXHAUSTION_POLICIES}, got {on_exhausted!r}')
        if shuffle_block_shards < 1:
            raise ValueError(f'shuffle_block_shards must be >= 1, got {shuffle_block_shards}')
        self.global_batch_size = int(global_batch_size)
        self.batching = batching
        self.on_exhausted = on_exhausted
        self.seed = int(seed)
        self.shuffle = shuffle
        self.shuffle_block_shards = shuffle_block_shards
        self.min_per_domain = int(min_per_domain)
        if shard_sizes is None:
            shard_sizes = [[n] for n in self.domain_sizes]
        self.shard_sizes = [np.asarray(s, dtype=np.int64) for s in shard_sizes]
        for k, sizes in enumerate(self.shard_sizes):
            if sizes.sum() != self.domain_sizes[k]:
                raise ValueError(f'domain {k}: shard sizes sum to {sizes.sum()}, expected {self.domain_sizes[k]}')

        initial = np.full(num_domains, 1.0 / num_domains) if weights is None else \
            validate_weights(weights, num_domains)
        self.step = 0
        self.cursors = np.zeros(num_domains, dtype=np.int64)
        self.epochs = np.zeros(num_domains, dtype=np.int64)
        self.active = np.ones(num_domains, dtype=bool)
        self.finished = False
        self.schedule: list[tuple[int, np.ndarray]] = [(0, initial)]
        # Current pass order of every domain, concatenated: domain k occupies
        # _flat_order[_order_start[k] : _order_start[k] + domain_sizes[k]]; _order_pass[k] says which pass.
        self._order_start = np.concatenate(([0], np.cumsum(self.domain_sizes)[:-1]))
        self._flat_order = np.zeros(int(self.domain_sizes.sum()), dtype=np.int64)
        self._order_pass = np.full(num_domains, -1, dtype=np.int64)

    @property
    def num_domains(self) -> int:
        return len(self.domain_sizes)

    # ----------------------------------------------------------------------------------------
    # weights

    def schedule_weights(self, weights: Sequence[float] | np.ndarray, effective_step: int) -> None:
        """Use ``weights`` from ``effective_step`` on; that step must not have been planned yet.

        Raises ``ValueError`` (and changes nothing) for bad weights or a step already planned.
        """
        w = validate_weights(weights, self.num_domains)
        if effective_step < self.step:
            raise ValueError(f'cannot schedule weights for step {effective_step}: steps up to {self.step - 1} '
                             'are already planned (increase the loader delay)')
        # Keep earlier entries: a rewind to the trainer's position (behind the planned step) needs them;
        # the sampler drops the ones the trainer has passed (forget_schedule_before).
        self.schedule = [(s, v) for s, v in self.schedule if s < effective_step] + [(int(effective_step), w)]

    def weights_at(self, step: int) -> np.ndarray:
        """The scheduled weights in force at ``step`` (before masking inactive domains)."""
        starts = [start for start, _ in self.schedule]
        return self.schedule[max(bisect.bisect_right(starts, step) - 1, 0)][1]

    def active_weights(self, step: int) -> np.ndarray:
        """Weights at ``step`` restricted to active domains and renormalised (zeros if none left)."""
        w = np.where(self.active, self.weights_at(step), 0.0)
        total = w.sum()
        return w / total if total > 0 else w

    def domain_epochs(self) -> np.ndarray:
        """Passes over each domain so far, fractional (1.5 = one full pass and half of the next)."""
        return self.epochs + self.cursors / self.domain_sizes

    # ----------------------------------------------------------------------------------------
    # planning

    def counts_at(self, step: int) -> np.ndarray:
        """Samples of each domain in the global batch at ``step`` under the current active set."""
        w = self.active_weights(step)
        num_domains, batch = self.num_domains, self.global_batch_size
        counts = np.zeros(num_domains, dtype=np.int64)
        if w.sum() == 0:
            return counts
        if self.batching == 'mix':
            return apportion(w, batch, min_count=self.min_per_domain)
        if self.batching == 'random':
            rng = np.random.default_rng([self.seed, step, 1])
            counts[rng.choice(num_domains, p=w)] = batch
        else:  # round_robin over active domains
            counts[np.flatnonzero(self.active)[step % int(self.active.sum())]] = batch
        return counts

    def plan_next(self) -> PlannedBatch | None:
        """Plan the next global batch and advance the cursors; ``None`` once the mixture has ended."""
        if self.finished:
            return None
        counts = self.counts_at(self.step)
        if counts.sum() == 0 or (self.on_exhausted == 'stop' and (
                np.any(self.epochs > 0) or np.any(self.cursors + counts > self.domain_sizes))):
            self.finished = True
            return None
        domains, indices = [], []
        owed = self._take(counts, domains, indices)
        while owed > 0:  # a domain was dropped mid-batch: the others fill its place
            weights = self.active_weights(self.step)
            if not weights.any():  # none left, or only domains of weight 0
                self.finished = True
                return None
            top_up = apportion(weights, owed) if self.batching == 'mix' else self._whole_batch_counts(owed)
            owed = self._take(top_up, domains, indices)
        self.step += 1
        domain_ids = np.concatenate(domains)
        sample_ids = np.concatenate(indices)
        by_domain = np.argsort(domain_ids, kind='stable')
        return PlannedBatch(self.step - 1, domain_ids[by_domain], sample_ids[by_domain])

    def _whole_batch_counts(self, count: int) -> np.ndarray:
        """Give ``count`` samples to the active domain whose round-robin turn this step is (random /
        round-robin top-up after a drop)."""
        counts = np.zeros(self.num_domains, dtype=np.int64)
        if self.active.any():
            counts[np.flatnonzero(self.active)[self.step % int(self.active.sum())]] = count
        return counts

    def _take(self, counts: np.ndarray, domains: list, indices: list) -> int:
        """Append ``counts[k]`` next sample ids of each domain; return samples still owed after drops.

        Domains that stay inside their current pass are gathered in one vectorized step; only a
        domain that reaches the end of its pass takes the per-domain path.
        """
        self._refresh_orders()
        within = np.where(self.cursors + counts < self.domain_sizes, counts, 0)
        if within.any():
            starts = self._order_start + self.cursors
            offsets = np.repeat(starts - np.cumsum(within) + within, within)
            indices.append(self._flat_order[offsets + np.arange(int(within.sum()))])
            domains.append(np.repeat(np.arange(self.num_domains), within))
            self.cursors += within
        owed = 0
        for k in np.flatnonzero(counts - within):
            need = int(counts[k])
            while need > 0:
                order = self._order(k)
                start = int(self.cursors[k])
                got = min(need, len(order) - start)
                indices.append(order[start:start + got].copy())  # the buffer is refilled on wrap
                domains.append(np.full(got, k, dtype=np.int64))
                self.cursors[k] += got
                need -= got
                if self.cursors[k] == self.domain_sizes[k]:
                    self.cursors[k] = 0
                    self.epochs[k] += 1
                    if self.on_exhausted == 'drop':
                        self.active[k] = False
                        owed += need
                        break
        return owed

    def _refresh_orders(self) -> None:
        """Make sure every domain's order segment holds its current pass."""
        for k in np.flatnonzero(self._order_pass != self.epochs):
            self._order(k)

    def _order(self, k: int) -> np.ndarray:
        """Sample ids of domain k in the order of its current pass (a view into the flat buffer)."""
        segment = self._flat_order[self._order_start[k]:self._order_start[k] + self.domain_sizes[k]]
        if self._order_pass[k] != self.epochs[k]:
            segment[:] = self._pass_order(k, int(self.epochs[k]))
            self._order_pass[k] = self.epochs[k]
        return segment

    def _pass_order(self, k: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.domain_sizes[k], dtype=np.int64)
        rng = np.random.default_rng([self.seed, k, epoch])
        return shard_block_order(self.shard_sizes[k], rng, self.shuffle_block_shards)

    def upcoming_samples(self, k: int, count: int) -> np.ndarray:
        """The next ``count`` sample ids domain ``k`` will hand out in its current pass (for prefetching)."""
        order = self._order(k)
        start = int(self.cursors[k])
        return order[start:start + count]

    # ----------------------------------------------------------------------------------------
    # state

    def forget_schedule_before(self, step: int) -> None:
        """Drop schedule entries superseded before ``step``; nothing earlier will be planned again."""
        starts = [start for start, _ in self.schedule]
        self.schedule = self.schedule[max(bisect.bisect_right(starts, step) - 1, 0):]

    def state_dict(self, include_schedule: bool = True) -> dict[str, Any]:
        """Everything needed to continue planning exactly from ``self.step`` (primitives only).

        ``include_schedule=False`` gives only the position (cursors etc.), for cheap per-step snapshots.
        """
        state = {
            'step': int(self.step),
            'cursors': self.cursors.tolist(),
            'epochs': self.epochs.tolist(),
            'active': self.active.tolist(),
            'finished': bool(self.finished),
        }
        if include_schedule:
            state['schedule'] = [[int(s), w.tolist()] for s, w in self.schedule]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the domain count must match."""
        if len(state['cursors']) != self.num_domains:
            raise ValueError(f'planner state has {len(state["cursors"])} domains, this mixture has {self.num_domains}')
        self.step = int(state['step'])
        self.cursors = np.asarray(state['cursors'], dtype=np.int64)
        self.epochs = np.asarray(state['epochs'], dtype=np.int64)
        self.active = np.asarray(state['active'], dtype=bool)
        self.finished = bool(state['finished'])
        self.schedule = [(int(s), np.asarray(w, dtype=np.float64)) for s, w in state['schedule']]
