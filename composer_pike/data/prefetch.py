"""Background downloads of the remote shards the next steps will read."""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np

from composer_pike.data.dataset import MixtureDataset
from composer_pike.data.planner import MixturePlanner

log = logging.getLogger(__name__)


class ShardPrefetcher:
    """Downloads the shards each remote domain will read in the next ``horizon`` steps, in threads.

    Only domains whose read position has moved past what was already requested do any work, so the
    per-step cost is one vectorized comparison over K. Prefetching only saves time: a shard that
    fails to download or verify here is logged, kept in ``failed`` (shard id -> error) and handed
    back to the readers (:meth:`MixtureDataset.release_failed_prefetch`), which end the run when,
    and only when, they need it and cannot read it either. When the loader stops reading (the run
    ended, or its iterator was dropped), :meth:`cancel_queued` drops the downloads no thread has
    started, so they do not run at interpreter exit.
    """

    def __init__(self, dataset: MixtureDataset, horizon_steps: int, threads: int = 4) -> None:
        self.dataset = dataset
        self.horizon_steps = horizon_steps
        self.remote = np.array([s.remote is not None for s in dataset.sources])
        self.requested: set[int] = set()  # dataset shard ids
        self.requested_until = np.zeros(dataset.num_domains, dtype=np.int64)  # samples, all passes
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix='pike-prefetch') \
            if self.remote.any() else None
        self.sample_offsets = dataset.streaming.sample_offset_per_stream
        self.shard_starts = dataset.streaming.sample_offset_per_shard  # first dataset sample id of every shard
        self.failed: dict[int, str] = {}
        self._in_flight: dict[int, Future] = {}  # dataset shard id -> its download

    def after_plan(self, planner: MixturePlanner, counts: np.ndarray) -> None:
        if self.pool is None:
            return
        position = planner.epochs * planner.domain_sizes + planner.cursors  # samples read, all passes
        ahead = position + counts * self.horizon_steps
        stale = np.flatnonzero(self.remote & (ahead > self.requested_until))
        if stale.size:
            self._in_flight = {shard: f for shard, f in self._in_flight.items() if not f.done()}
        for k in stale:
            ids = self.sample_offsets[k] + planner.upcoming_samples(k, int(counts[k]) * self.horizon_steps + 1)
            for shard in np.unique(np.searchsorted(self.shard_starts, ids, side='right') - 1).tolist():
                if shard not in self.requested:
                    self.requested.add(shard)
                    self._in_flight[shard] = self.pool.submit(self._prepare, shard)
            self.requested_until[k] = ahead[k]

    def wait(self) -> None:
        """Block until every download requested so far has finished or failed."""
        futures_wait(list(self._in_flight.values()))

    def cancel_queued(self) -> None:
        """Drop the downloads no thread has started yet.

        Downloads already running finish. The cancelled shards are forgotten, and so is how far
        their domains were requested, so a later pass over the loader asks for them again.
        """
        cancelled = [shard for shard, future in self._in_flight.items() if future.cancel()]
        for shard in cancelled:
            del self._in_flight[shard]
            self.requested.discard(shard)
        self.requested_until[self.dataset.streaming.stream_per_shard[cancelled]] = 0

    def _prepare(self, shard: int) -> None:
        """Start downloading ``shard``; never wait on a download someone else is doing."""
        try:
            self.dataset.streaming.prepare_shard(shard, blocking=False)
        except Exception as error:
            message = self.dataset.describe_shard_failure(shard, str(error))
            self.failed[shard] = message
            log.warning('prefetch failed, left to the readers: %s', message)
            self.dataset.release_failed_prefetch(shard)
