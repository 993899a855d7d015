"""The K-domain dataset read by ``(domain, index)``: one StreamingDataset with a Stream per domain."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from streaming import Stream
from torch.utils.data import Dataset

from composer_pike.data.manifest import DomainSource
from composer_pike.data.shared_memory import open_streaming_dataset
from composer_pike.data.streams import (VerifiedStream, check_safe_columns, read_local_index, seq_len_of,
                                        verify_local_shards)
from composer_pike.data.tokens import TokenReader, check_token_column
from composer_pike.data.planner import MixturePlanner
from composer_pike.data.probe_order import ProbeOrder

if TYPE_CHECKING:
    from composer_pike.data.sampler import MixtureBatchSampler

NOT_ATTACHED = 'this MixtureDataset is not attached to a loader; use build_mixture_dataloader'


SHARD_FAILED = 4  # our shard state beyond streaming's INVALID/REMOTE/PREPARING/LOCAL (0-3): never read it


class MixtureDataset(Dataset):
    """K domains read by ``(domain, index)``, steered through a :class:`MixturePlanner`.

    All domains live in ONE StreamingDataset, one Stream per domain (each with its own local cache
    directory): streaming keeps file descriptors for every dataset's shared memory, so one dataset
    per domain needs O(K^2) descriptors; one dataset needs a fixed number. Sample ``index`` of
    domain ``k`` is the dataset's sample ``sample_offset_per_stream[k] + index``.

    Args:
        sources: one :class:`DomainSource` per domain, in mixing order.
        validate_hash: hash checked on every shard download from a remote (streaming's
            ``validate_hash``), and on local shards at build time when ``verify_local=True``; None: no check.
        download_retry / download_timeout: attempts after a failed one per remote file (each also retried
            by the S3 client) and seconds per download; a download failing its hash is fetched again, up to
            download_retry times.
        verify_local: hash-check local shards (no remote) once at build time.
        tokens: how a sample's ``tokens`` column becomes ids (dtype, ``max_seq_len``), see
            :class:`composer_pike.data.tokens.TokenReader`; every domain must give the same length.
    """

    def __init__(
        self,
        sources: Sequence[DomainSource],
        *,
        validate_hash: str | None = None,
        download_retry: int = 3,
        download_timeout: float = 60,
        verify_local: bool = True,
        tokens: TokenReader = TokenReader(),
    ) -> None:
        from streaming.base.world import World

        names = [s.name for s in sources]
        if not names:
            raise ValueError('a mixture needs at least one domain')
        if len(set(names)) != len(names):
            raise ValueError(f'domain names must be unique, got {names}')
        by_local: dict[str, list[str]] = {}
        for source in sources:
            by_local.setdefault(os.path.abspath(source.local), []).append(source.name)
        for local, sharing in by_local.items():
            if len(sharing) > 1:
                raise ValueError(f'domains {sharing} share the local directory {local}: give each its own')
        self.sources = list(sources)
        self.tokens = tokens

        def make_streams() -> list[Stream]:
            return [VerifiedStream(remote=s.remote, local=s.local, validate_hash=validate_hash,
                                   download_retry=download_retry, download_timeout=download_timeout)
                    for s in self.sources]

        world = World.detect()
        # The streams that fetch the indexes also serve the dataset: each keeps its object-store client.
        streams = make_streams()
        for source, stream in zip(self.sources, streams):
            if source.remote is None:
                index = read_local_index(source)
                if verify_local and validate_hash:
                    verify_local_shards(source, index, validate_hash)
            try:  # reads (for a remote: fetches) the index only, so that its failures name the domain
                shards = stream.get_shards(world, allow_unsafe_types=True)  # nothing is decoded here
            except Exception as error:
                raise RuntimeError(f"domain '{source.name}': cannot read the MDS index of "
                                   f'{source.remote or source.local}: {error}') from error
            check_safe_columns(source.name, shards)
            check_token_column(source.name, shards)
            if sum(shard.samples for shard in shards) == 0:
                raise ValueError(f"domain '{source.name}' has no samples")
        self.streaming = open_streaming_dataset(make_streams, streams=streams, shuffle=False)
        self.domain_names = names
        self.domain_sizes = self.streaming.samples_per_stream.astype(np.int64)
        self._sample_offsets = self.streaming.sample_offset_per_stream.tolist()
        self._sizes = self.domain_sizes.tolist()
        self._failures: dict[int, str] = {}  # shard id -> why it failed, in this process
        seq_lens = {}
        for k, (name, first_shard) in enumerate(zip(names, self.streaming.shard_offset_per_stream)):
            written = None if tokens.max_seq_len else seq_len_of(self.streaming.shards[first_shard])
            seq_lens[name] = written or len(self[(k, 0)][2])
        if len(set(seq_lens.values())) > 1:
            raise ValueError(f'domains have different seq_len: {seq_lens}')
        self.seq_len = next(iter(seq_lens.values()))
        self.sampler: MixtureBatchSampler | None = None  # set by build_mixture_dataloader
        self.probe_order: ProbeOrder | None = None  # set by build_mixture_dataloader

    @property
    def shard_sizes(self) -> list[np.ndarray]:
        """Samples per shard, per domain."""
        ds = self.streaming
        return [ds.samples_per_shard[a:a + n] for a, n in zip(ds.shard_offset_per_stream, ds.shards_per_stream)]

    def __len__(self) -> int:
        return int(self.domain_sizes.sum())

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        domain, index = item
        if not 0 <= index < self._sizes[domain]:
            raise IndexError(f"domain '{self.domain_names[domain]}' has {self._sizes[domain]} samples, "
                             f'got index {index}')
        sample_id = self._sample_offsets[domain] + int(index)
        try:
            sample = self.streaming.get_item(sample_id)
        except Exception as error:
            raise self.shard_failure(self.streaming.spanner[sample_id][0], error) from error
        return domain, index, self.tokens(sample, self.domain_names[domain], index)

    def shard_failure(self, shard_id: int, error: BaseException) -> RuntimeError:
        """The error for a shard that could not be made local, naming domain, shard and source.

        Marks the shard failed in streaming's shared state, so that readers in every process that
        wait for it stop waiting and fail too instead of hanging, and none of them reads it.
        """
        already = self.streaming._shard_states[shard_id] == SHARD_FAILED
        if already and shard_id in self._failures:
            return RuntimeError(self._failures[shard_id])
        cause = 'it failed to download or verify earlier in this run' if already else str(error)
        message = self.describe_shard_failure(shard_id, cause)
        self._failures.setdefault(shard_id, message)
        self._leave_preparing(shard_id, SHARD_FAILED)
        return RuntimeError(message)

    def describe_shard_failure(self, shard_id: int, cause: str) -> str:
        """One line naming the domain, the shard file and the remote (or local) directory."""
        ds = self.streaming
        source = self.sources[int(ds.stream_per_shard[shard_id])]
        raw_info, zip_info = ds.shards[shard_id].file_pairs[0]
        return (f"domain '{source.name}': shard {(zip_info or raw_info).basename} of "
                f'{source.remote or source.local} cannot be read: {cause}')

    def release_failed_prefetch(self, shard_id: int) -> None:
        """Hand a shard whose background download failed back to the readers.

        The shard returns to streaming's REMOTE state, so a reader that needs it downloads it
        itself (waiting readers wake up and do so) and fails with :meth:`shard_failure` if it still
        cannot: a shard fails the run exactly when the run reads it, whatever the timing of the
        prefetcher, and a shard the run never reads never fails it.
        """
        from streaming.base.dataset import _ShardState
        self._leave_preparing(shard_id, _ShardState.REMOTE)

    def _leave_preparing(self, shard_id: int, state: int) -> None:
        """Move a shard left PREPARING by a failed download to ``state``, under streaming's cache lock."""
        from filelock import FileLock
        from streaming.base.dataset import _ShardState
        ds = self.streaming
        if not hasattr(ds, '_cache_filelock'):  # streaming creates it lazily, as here
            ds._cache_filelock = FileLock(ds._cache_filelock_path)
        with ds._cache_filelock:
            if ds._shard_states[shard_id] == _ShardState.PREPARING:
                ds._shard_states[shard_id] = state

    def reset_object_store_clients(self, worker_id: int = 0) -> None:
        """Give every stream a fresh downloader (a DataLoader ``worker_init_fn``).

        A forked worker inherits the main process's object-store clients together with their open
        keep-alive connections; a request sent on a socket the main process also uses can read the
        main process's response as its own (a shard file that holds an HTTP header). Fresh
        downloaders open their own connections on first use.
        """
        from streaming.base.storage.download import CloudDownloader
        for stream in self.streaming.streams:
            stream._downloader = CloudDownloader.get(stream.remote)

    # ---- the control surface -----------------------------------------------------------------

    @property
    def planner(self) -> MixturePlanner:
        if self.sampler is None:
            raise RuntimeError(NOT_ATTACHED)
        return self.sampler.planner

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

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

    def latest_weights(self) -> tuple[int, np.ndarray]:
        """(first step, weights) of the latest weights scheduled: what the last ``set_weights`` asked for,
        not renormalised over the active domains (the initial weights until then)."""
        step, weights = self.planner.schedule[-1]
        return step, weights.copy()

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
        """True once the exhaustion policy ended the mixture (``'stop'``, or ``'drop'`` with no domain of
        positive weight left) and the trainer has taken its last batch."""
        return self.planner.finished and self.sampler.consumed >= self.planner.step

    def probe_batch(self, domain: int, num_samples: int, num_chunks: int = 1, rank: int = 0,
                    world_size: int = 1) -> dict[str, torch.Tensor]:
        """This rank's share of ``num_samples`` samples of ``domain``, as ``num_chunks`` consecutive chunks.

        The samples are the next ``num_samples`` of the domain's probe order (see
        :mod:`composer_pike.data.probe_order`): a fresh pseudo-random permutation of the domain per pass,
        keyed by the loader's seed, the domain and the pass, so no sample repeats within a pass and
        the choice depends neither on training progress nor on timing. Every call advances the
        domain's probe cursor by ``num_samples``, the global count, whatever ``rank`` (the cursors
        are saved by :meth:`state_dict`). Each rank takes its slice of every chunk, so a global chunk
        holds the same samples on any number of ranks. Samples are read by random access: a remote
        shard not yet local is downloaded now.
        """
        if num_samples % (num_chunks * world_size):
            raise ValueError(f'probe size {num_samples} is not divisible by num_chunks x world size '
                             f'({num_chunks} x {world_size})')
        if self.probe_order is None:
            raise RuntimeError(NOT_ATTACHED)
        ids = self.probe_order.take(domain, num_samples)
        ids = ids.reshape(num_chunks, world_size, -1)[:, rank].reshape(-1)
        return collate_samples([self[(domain, int(i))] for i in ids])

    # ---- Composer dataset resumption (called with samples seen in the current epoch) ---------

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict[str, Any]:
        """Planner state at the trainer's position and the probe cursors: primitives only, identical on every rank.

        The probe cursors are taken as they are now, not rewound to the trainer's position: PiKE
        probes at BEFORE_TRAIN_BATCH of a check step, before that step's checkpoint, and a run
        resumed from that checkpoint starts after the step, so it must not draw that probe again.
        """
        del num_samples, from_beginning  # the loader itself counts the batches the trainer took
        return {'planner': self.sampler.position(), 'consumed': int(self.sampler.consumed),
                'probe_order': self.probe_order.state_dict(), 'mixture': self._identity()}

    def _identity(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint for its positions to mean the same samples."""
        return {'domains': list(self.domain_names), 'samples': self.domain_sizes.tolist(), 'seed': self.planner.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where :meth:`state_dict` was taken (Composer calls this on resume).

        A state without probe cursors (written before probes had an order of their own) starts the
        probe orders from the beginning. The domains (names, order and samples) and the loader's seed
        must be the checkpoint's: the cursors index those domains' shuffles, so anything else would
        resume silently into other samples (or weights and statistics onto other domains).
        """
        if 'mixture' in state:  # absent from checkpoints written before 2026-12-05
            saved, current = state['mixture'], self._identity()
            different = [key for key in current if saved.get(key) != current[key]]
            if different:
                details = '; '.join(f'{key}: checkpoint {saved.get(key)}, this run {current[key]}' for key in different)
                raise ValueError(f'cannot resume the mixture from this checkpoint: {details}. Resume with the '
                                 'checkpoint\'s data and seed, or start the run without the checkpoint')
        self.sampler.restore(state['planner'], int(state['consumed']))
        self.probe_order = ProbeOrder(self.domain_sizes, self.planner.seed)
        if 'probe_order' in state:
            self.probe_order.load_state_dict(state['probe_order'])


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
