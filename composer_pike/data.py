"""The mixture data path: one StreamingDataset per domain, batches planned by :class:`MixturePlanner`.

Layout of the pieces (all in the main process unless stated):

* :class:`MixtureDataset` - map-style dataset over K StreamingDatasets; item ``(domain, index)``
  reads one packed sequence by random access (in DataLoader workers). It is also the handle the
  PiKE algorithm and Composer talk to: ``set_weights``, ``state_dict``/``load_state_dict``,
  ``probe_batch``.
* :class:`MixtureBatchSampler` - asks the planner for global batches, keeps a snapshot of the
  planner before every planned step, and yields this rank's slice.
* :class:`MixtureDataLoader` - a DataLoader that counts the batches it has handed to the trainer,
  so the sampler knows which planned-but-unused batches to replan after an interrupted iteration
  and which snapshot a checkpoint must hold.

Effective-step rule: weights passed to ``set_weights(w, after_step=t)`` are used from global step
``t + 1 + delay`` on. ``delay`` must be at least the loader's look-ahead (``num_workers *
prefetch_factor`` batches are planned before the trainer asks for them); this is checked when the
loader is built, so the rule never depends on timing.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from composer_pike.planner import MixturePlanner, PlannedBatch

log = logging.getLogger(__name__)

MANIFEST_NAME = 'manifest.json'


@dataclass(frozen=True)
class DomainSource:
    """Where one domain's MDS split lives: ``remote`` (s3://..., optional) cached into ``local``."""
    name: str
    local: str
    remote: str | None = None


def sources_from_manifest(manifest: str, split: str = 'train', cache_root: str | None = None) -> list[DomainSource]:
    """Domain sources for ``split`` from a pike-prep manifest (local path or remote URL).

    For a remote manifest every domain is streamed into ``cache_root/<domain>/<split>``.
    """
    data = read_manifest(manifest, cache_root)
    base = manifest.rsplit('/', 1)[0] if manifest.endswith('.json') else manifest.rstrip('/')
    remote = '://' in base
    if remote and cache_root is None:
        raise ValueError(f'manifest {manifest} is remote: a local cache_root is required')
    sources = []
    for name, info in data['domains'].items():
        if split not in info['splits']:
            raise ValueError(f"domain '{name}': manifest {manifest} has no '{split}' split")
        rel = info['splits'][split]['path']
        if remote:
            sources.append(DomainSource(name, os.path.join(cache_root, name, split), f'{base}/{rel}'))
        else:
            sources.append(DomainSource(name, os.path.join(base, rel)))
    return sources


def read_manifest(manifest: str, cache_root: str | None = None) -> dict[str, Any]:
    """Load a pike-prep manifest from a local path (file or directory) or a remote URL."""
    if '://' in manifest:
        from streaming.base.storage.download import CloudDownloader
        url = manifest if manifest.endswith('.json') else f'{manifest.rstrip("/")}/{MANIFEST_NAME}'
        if cache_root is None:
            raise ValueError(f'manifest {manifest} is remote: a local cache_root is required')
        local = os.path.join(cache_root, MANIFEST_NAME)
        os.makedirs(cache_root, exist_ok=True)
        CloudDownloader.direct_download(url, local, timeout=60)
        path = local
    else:
        path = manifest if manifest.endswith('.json') else os.path.join(manifest, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no pike-prep manifest at {path}')
    with open(path) as f:
        return json.load(f)


@functools.cache
def _clean_stale_shared_memory_once() -> None:
    """Remove shared memory a crashed run left behind, before this process builds its first dataset.

    streaming's cleaner unlinks every streaming segment on the host, live ones included, so it must
    not run again once this process holds datasets. (It can still disturb another job running on the
    same machine at that moment.)
    """
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()


def _check_local_split(source: DomainSource) -> dict[str, Any]:
    """Read a local MDS index, failing with the domain named if it is missing."""
    index_path = os.path.join(source.local, 'index.json')
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"domain '{source.name}': no MDS index at {index_path}")
    with open(index_path) as f:
        return json.load(f)


def verify_local_shards(source: DomainSource, index: dict[str, Any]) -> None:
    """Check every local shard file against the hashes its index.json records."""
    from streaming.base.hashing import get_hash
    for shard in index['shards']:
        for key in ('raw_data', 'zip_data'):
            info = shard.get(key)
            if not info or not info.get('hashes'):
                continue
            path = os.path.join(source.local, info['basename'])
            if not os.path.isfile(path):
                continue
            with open(path, 'rb') as f:
                data = f.read()
            for algo, expected in info['hashes'].items():
                if get_hash(algo, data) != expected:
                    raise ValueError(f"domain '{source.name}': shard {path} does not match its {algo} hash")


def _seq_len_of(index: dict[str, Any]) -> int | None:
    """Sequence length from a fixed-shape ``tokens`` column encoding (``ndarray:uint16:256``)."""
    for shard in index['shards'][:1]:
        for name, encoding in zip(shard.get('column_names', []), shard.get('column_encodings', [])):
            if name == 'tokens':
                match = re.fullmatch(r'ndarray:\w+:(\d+)', encoding)
                return int(match.group(1)) if match else None
    return None


class MixtureDataset(Dataset):
    """K domain StreamingDatasets read by ``(domain, index)``, steered through a :class:`MixturePlanner`.

    Args:
        sources: one :class:`DomainSource` per domain, in mixing order.
        validate_hash: hash checked on every shard download from a remote (streaming's
            ``validate_hash``), and on local shards at build time when ``verify_local=True``.
        download_retry / download_timeout: streaming's per-shard download retry count and seconds.
        verify_local: hash-check local shards (no remote) once at build time.
    """

    def __init__(
        self,
        sources: Sequence[DomainSource],
        *,
        validate_hash: str | None = None,
        download_retry: int = 2,
        download_timeout: float = 60,
        verify_local: bool = True,
    ) -> None:
        from streaming import StreamingDataset

        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f'domain names must be unique, got {names}')
        _clean_stale_shared_memory_once()
        self.sources = list(sources)
        self.domains = []
        seq_lens = {}
        for source in self.sources:
            if source.remote is None:
                index = _check_local_split(source)
                if verify_local:
                    verify_local_shards(source, index)
                seq_lens[source.name] = _seq_len_of(index)
            dataset = StreamingDataset(
                remote=source.remote,
                local=source.local,
                shuffle=False,
                validate_hash=validate_hash,
                download_retry=download_retry,
                download_timeout=download_timeout,
                allow_unsafe_types=False,
            )
            self.domains.append(dataset)
            if source.remote is not None:
                with open(os.path.join(source.local, 'index.json')) as f:
                    seq_lens[source.name] = _seq_len_of(json.load(f))
        for name, dataset in zip(names, self.domains):
            if seq_lens[name] is None:
                seq_lens[name] = len(self._tokens(dataset, 0, name))
        if len(set(seq_lens.values())) > 1:
            raise ValueError(f'domains have different seq_len: {seq_lens}')
        self.seq_len = next(iter(seq_lens.values()))
        self.domain_names = names
        self.domain_sizes = np.array([d.num_samples for d in self.domains], dtype=np.int64)
        for name, size in zip(names, self.domain_sizes):
            if size == 0:
                raise ValueError(f"domain '{name}' has no samples")
        self.sampler: MixtureBatchSampler | None = None  # set by build_mixture_dataloader

    @staticmethod
    def _tokens(dataset: Any, index: int, name: str) -> np.ndarray:
        sample = dataset[int(index)]
        if 'tokens' not in sample:
            raise KeyError(f"domain '{name}': samples have no 'tokens' column (columns: {sorted(sample)})")
        return sample['tokens']

    def __len__(self) -> int:
        return int(self.domain_sizes.sum())

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        domain, index = item
        return domain, index, self._tokens(self.domains[domain], index, self.domain_names[domain])

    # ---- the control surface -----------------------------------------------------------------

    @property
    def planner(self) -> MixturePlanner:
        if self.sampler is None:
            raise RuntimeError('this MixtureDataset is not attached to a loader; use build_mixture_dataloader')
        return self.sampler.planner

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def delay(self) -> int:
        """Steps between deciding new weights and the first batch that uses them, minus one."""
        return self.sampler.delay if self.sampler else 0

    def set_weights(self, weights: Sequence[float] | np.ndarray, *, after_step: int) -> int:
        """Schedule ``weights`` from step ``after_step + 1 + delay`` on and return that step.

        ``after_step`` is the index of the batch just trained (Composer: ``timestamp.batch - 1``
        at BATCH_END). Raises ``ValueError`` and changes nothing on bad weights.
        """
        effective = int(after_step) + 1 + self.delay
        self.planner.schedule_weights(weights, effective)
        return effective

    def weights_at(self, step: int) -> np.ndarray:
        """Mixing weights in force at global step ``step`` (inactive domains zeroed).

        Valid for steps at or after the trainer's position: the loader forgets superseded weights.
        """
        return self.planner.active_weights(step)

    def counts_at(self, step: int) -> np.ndarray:
        """Samples per domain in the global batch at ``step`` (as planned now)."""
        return self.planner.counts_at(step)

    def domain_epochs(self) -> np.ndarray:
        """Passes over each domain's train split consumed by the trainer (fractional)."""
        position = self.sampler.position()
        return np.asarray(position['epochs']) + np.asarray(position['cursors']) / self.domain_sizes

    @property
    def finished(self) -> bool:
        """True once the exhaustion policy ended the mixture (``on_exhausted='stop'``)."""
        return self.planner.finished and self.sampler.consumed >= self.planner.step

    def probe_batch(self, domain: int, num_samples: int, num_chunks: int = 1, rank: int = 0,
                    world_size: int = 1) -> dict[str, torch.Tensor]:
        """This rank's share of ``num_samples`` samples of ``domain``, as ``num_chunks`` consecutive chunks.

        The samples are the next ones the domain will train on (as of the trainer's current step),
        so their shards are already local or being prefetched; the choice does not depend on timing.
        Each rank takes its slice of every chunk, so a global chunk holds the same samples on any
        number of ranks.
        """
        if num_samples % (num_chunks * world_size):
            raise ValueError(f'probe size {num_samples} is not divisible by num_chunks x world size '
                             f'({num_chunks} x {world_size})')
        ids = self.planner.samples_after(self.sampler.position(), domain, num_samples)
        ids = ids.reshape(num_chunks, world_size, -1)[:, rank].reshape(-1)
        return collate_samples([self[(domain, int(i))] for i in ids])

    # ---- Composer dataset resumption (called with samples seen in the current epoch) ---------

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict[str, Any]:
        """Planner state at the trainer's position: primitives only, identical on every rank."""
        del num_samples, from_beginning  # the loader itself counts the batches the trainer took
        return {'planner': self.sampler.position(), 'consumed': int(self.sampler.consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where :meth:`state_dict` was taken (Composer calls this on resume)."""
        self.sampler.restore(state['planner'], int(state['consumed']))


def collate_samples(samples: Sequence[tuple[int, int, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack ``(domain, index, tokens)`` items into a causal-LM batch.

    ``labels`` is a copy of ``input_ids``: Composer's eval shifts labels in place.
    """
    tokens = torch.from_numpy(np.stack([s[2] for s in samples]).astype(np.int64))
    return {
        'input_ids': tokens,
        'labels': tokens.clone(),
        'domain': torch.tensor([s[0] for s in samples], dtype=torch.int64),
        'sample_id': torch.tensor([s[1] for s in samples], dtype=torch.int64),
    }


class ShardPrefetcher:
    """Downloads the shards each remote domain will read in the next ``horizon`` steps, in threads.

    Only domains whose read position has moved past what was already requested do any work, so the
    per-step cost is one vectorized comparison over K.
    """

    def __init__(self, dataset: MixtureDataset, horizon_steps: int, threads: int = 4) -> None:
        self.dataset = dataset
        self.horizon_steps = horizon_steps
        self.remote = np.array([s.remote is not None for s in dataset.sources])
        self.requested: list[set[int]] = [set() for _ in dataset.domains]
        self.requested_until = np.zeros(len(dataset.domains), dtype=np.int64)  # samples, all passes
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix='pike-prefetch') \
            if self.remote.any() else None
        self.offsets = [d.sample_offset_per_shard for d in dataset.domains]

    def after_plan(self, planner: MixturePlanner, counts: np.ndarray) -> None:
        if self.pool is None:
            return
        position = planner.epochs * planner.domain_sizes + planner.cursors  # samples read, all passes
        ahead = position + counts * self.horizon_steps
        stale = np.flatnonzero(self.remote & (ahead > self.requested_until))
        for k in stale:
            ids = planner.upcoming_samples(k, int(counts[k]) * self.horizon_steps + 1)
            shards = np.unique(np.searchsorted(self.offsets[k], ids, side='right') - 1)
            for shard in shards.tolist():
                if shard not in self.requested[k]:
                    self.requested[k].add(shard)
                    self.pool.submit(self._prepare, k, shard)
            self.requested_until[k] = ahead[k]

    def _prepare(self, domain: int, shard: int) -> None:
        """Start downloading ``shard``; never wait on a download someone else is doing.

        On failure the shard goes back to the 'remote' state, so the worker that reads it downloads
        it again and raises, instead of waiting forever on a shard left 'preparing'.
        """
        dataset = self.dataset.domains[domain]
        try:
            dataset.prepare_shard(shard, blocking=False)
        except Exception as error:
            from streaming.base.dataset import _ShardState
            with dataset._cache_filelock:
                dataset._shard_states[shard] = _ShardState.REMOTE
            log.warning("prefetch of domain '%s' shard %d failed: %s", self.dataset.domain_names[domain], shard, error)


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
        while self.planner.step < epoch_end:
            self._snapshots[self.planner.step] = self.planner.state_dict(include_schedule=False)
            batch = self.planner.plan_next()
            if batch is None:
                return
            if self.prefetcher is not None:
                self.prefetcher.after_plan(self.planner, np.bincount(batch.domains, minlength=self.planner.num_domains))
            yield self._rank_items(batch)

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


class MixtureDataLoader(DataLoader):
    """A DataLoader over a :class:`MixtureDataset` that tells the sampler which batches were taken."""

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
        for batch in super().__iter__():
            sampler.mark_consumed()
            yield batch


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
        delay: effective-step delay (see module docstring); default and minimum: the look-ahead.
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
        shard_sizes=[d.samples_per_shard for d in dataset.domains],
        shuffle=shuffle,
        shuffle_block_shards=shuffle_block_shards,
    )
    steps_per_epoch = steps_per_epoch or max(1, len(dataset) // global_batch_size)
    sampler = MixtureBatchSampler(dataset, planner, rank=rank, world_size=world_size,
                                  steps_per_epoch=steps_per_epoch, delay=delay, prefetch_steps=prefetch_steps)
    dataset.sampler = sampler
    return MixtureDataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
