"""The mixture data path: one StreamingDataset with a Stream per domain, batches planned by :class:`MixturePlanner`.

Layout of the pieces (all in the main process unless stated):

* :class:`MixtureDataset` - map-style dataset over one StreamingDataset holding one Stream per
  domain (each with its own local cache directory); item ``(domain, index)`` reads one packed
  sequence by random access (in DataLoader workers). It is also the handle the PiKE algorithm and
  Composer talk to: ``set_weights``, ``state_dict``/``load_state_dict``, ``probe_batch`` (which reads
  each domain in a probe order of its own, :class:`composer_pike.probe_order.ProbeOrder`).
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

import contextlib
import functools
import json
import logging
import os
import random
import re
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from streaming import Stream
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from composer_pike.planner import MixturePlanner, PlannedBatch
from composer_pike.probe_order import ProbeOrder

log = logging.getLogger(__name__)

MANIFEST_NAME = 'manifest.json'
NOT_ATTACHED = 'this MixtureDataset is not attached to a loader; use build_mixture_dataloader'


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
    remote = '://' in manifest
    if remote:
        base = manifest.rsplit('/', 1)[0] if manifest.endswith('.json') else manifest.rstrip('/')
    else:  # absolute, so the sources stay valid if the working directory changes
        base = os.path.abspath(manifest)
        base = os.path.dirname(base) if manifest.endswith('.json') else base
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
    """Load a pike-prep manifest from a local path (file or directory) or a remote URL.

    A remote manifest is downloaded on every call (to ``cache_root/manifest.json``), so a dataset
    rewritten at the remote is never described by a stale local copy.
    """
    if '://' in manifest:
        from streaming.base.storage.download import CloudDownloader
        url = manifest if manifest.endswith('.json') else f'{manifest.rstrip("/")}/{MANIFEST_NAME}'
        if cache_root is None:
            raise ValueError(f'manifest {manifest} is remote: a local cache_root is required')
        os.makedirs(cache_root, exist_ok=True)
        path = os.path.join(cache_root, MANIFEST_NAME)
        # streaming's downloaders skip a destination that exists: fetch to a fresh name, then replace.
        fresh = os.path.join(cache_root, f'.{MANIFEST_NAME}.{uuid.uuid4().hex}')
        try:
            CloudDownloader.direct_download(url, fresh, timeout=60)
            os.replace(fresh, path)
        finally:
            if os.path.exists(fresh):
                os.remove(fresh)
    else:
        path = manifest if manifest.endswith('.json') else os.path.join(manifest, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no pike-prep manifest at {path}')
    with open(path) as f:
        return json.load(f)


SETUP_LOCK_NAME = 'composer_pike_streaming_setup.lock'
SETUP_ATTEMPTS = 5  # StreamingDataset constructions tried when another process takes our shared-memory names


@contextlib.contextmanager
def _streaming_setup_lock(is_local_leader: bool) -> Iterator[None]:
    """Hold a host-wide lock while streaming sets up its shared memory (local leader only).

    streaming (0.13) registers a dataset under the first free shared-memory name prefix without a
    lock, and its stale-memory cleanup creates and unlinks names that live datasets use, so two
    processes building datasets at the same moment fail with FileExistsError / FileNotFoundError
    on /dev/shm/<prefix>_locals. The lock file lives next to the shared memory (/dev/shm), so it is
    shared by exactly the processes whose names can collide. Other ranks of the same node attach
    to what their leader registers and must not wait on the lock (the leader holds it through
    streaming's barriers).
    """
    if not is_local_leader:
        yield
        return
    from filelock import FileLock, Timeout
    root = '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()
    lock = FileLock(os.path.join(root, SETUP_LOCK_NAME), mode=0o666)
    try:
        lock.acquire(timeout=60)
    except Timeout:
        log.warning('waiting for another process to finish building its datasets (lock %s)', lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


SHM_DIR = '/dev/shm'
STREAMING_SHM = re.compile(r'(\d{6})_\w+')  # streaming's shared-memory names: <prefix>_<what>


@functools.cache
def _clean_stale_shared_memory_once() -> None:
    """Unlink streaming shared memory that no process maps any more, once per process (local leader,
    under the set-up lock).

    A crashed run leaves its segments in /dev/shm, and streaming refuses to reuse their local
    directories. streaming's own cleaner unlinks every streaming segment on the host, live ones
    included, so a job starting beside a running one took the running job's names and both used
    one prefix. Here a prefix is stale only when no process maps any of its segments (from
    /proc/<pid>/maps). Processes whose maps cannot be read (another user's, whose segments this
    process cannot unlink anyway, or a non-dumpable one such as a container's init) are taken to
    map none.
    """
    if not os.path.isdir(SHM_DIR):  # not Linux: nothing to list or clean
        return
    names = [name for name in os.listdir(SHM_DIR) if STREAMING_SHM.fullmatch(name)]
    if not names:
        return
    mapped = _mapped_shm_prefixes()
    for name in names:
        if name[:6] not in mapped:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.remove(os.path.join(SHM_DIR, name))


def _mapped_shm_prefixes() -> set[str]:
    """Prefixes of the streaming segments that some process whose memory maps are readable maps."""
    mapped: set[str] = set()
    marker = f'{SHM_DIR}/'
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/maps') as f:
                for line in f:
                    at = line.find(marker)
                    if at >= 0 and not line.rstrip().endswith('(deleted)'):
                        match = STREAMING_SHM.match(line[at + len(marker):].rstrip())
                        if match:
                            mapped.add(match[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process ended, or hides its maps
    return mapped


def _check_safe_columns(domain: str, shards: Sequence[Any]) -> None:
    """Refuse columns whose MDS encoding can run code when read (pickle), naming domain and column."""
    from streaming.base.format.mds.encodings import is_mds_encoding_safe
    for shard in shards:
        for column, encoding in zip(getattr(shard, 'column_names', []), getattr(shard, 'column_encodings', [])):
            if not is_mds_encoding_safe(encoding):
                raise ValueError(f"domain '{domain}': column '{column}' has the unsafe MDS encoding '{encoding}' "
                                 f'(reading it can run arbitrary code); composer-pike reads only safe encodings: '
                                 f'write the shards without it')


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


def _seq_len_of(shard: Any) -> int | None:
    """Sequence length from a shard reader's fixed-shape ``tokens`` column (``ndarray:uint16:256``)."""
    for name, encoding in zip(getattr(shard, 'column_names', []), getattr(shard, 'column_encodings', [])):
        if name == 'tokens':
            match = re.fullmatch(r'ndarray:\w+:(\d+)', encoding)
            return int(match.group(1)) if match else None
    return None


def open_streaming_dataset(make_streams: Callable[[], list[Stream]], *, streams: list[Stream] | None = None,
                           **dataset_kwargs: Any) -> Any:
    """A StreamingDataset over ``streams`` (else ``make_streams()``), set up so that jobs on one host
    do not collide in streaming's shared memory (see :func:`_streaming_setup_lock`).

    Stale shared memory of crashed runs is cleaned first, once per process. A FileExistsError means a
    process outside the lock (not composer-pike) took the same shared-memory name prefix at the same
    moment, before anything of ours was created: a single process tries again with fresh streams
    (StreamingDataset writes its settings into the ones it was given). With several ranks the others
    are already past streaming's barrier, so the error is raised.
    """
    from streaming import StreamingDataset
    from streaming.base.world import World

    world = World.detect()
    streams = streams if streams is not None else make_streams()
    attempt = 1
    while True:
        try:
            with _streaming_setup_lock(world.is_local_leader):
                if world.is_local_leader:
                    _clean_stale_shared_memory_once()
                # Every rank picks streaming's prefix from what /dev/shm holds: the others must look
                # only once their leader holds the lock and has cleaned.
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.barrier()
                return StreamingDataset(streams=streams, allow_unsafe_types=False, **dataset_kwargs)
        except FileExistsError as error:
            if world.num_ranks > 1 or attempt == SETUP_ATTEMPTS:
                raise
            log.warning('streaming shared memory taken by another process (%s); trying again', error)
            time.sleep(random.uniform(0.05, 0.5))
            streams = make_streams()
            attempt += 1


class VerifiedStream(Stream):
    """A Stream whose shard files appear in the local cache only once they pass ``validate_hash``.

    streaming (0.13) downloads a shard file (the raw one, or the compressed one) to its final path
    and checks its hash after, so a concurrent reader can read a corrupt shard, and a file that
    failed stays in the cache and fails again on every later attempt, in this run and the next.
    Here the file the remote holds is downloaded under a temporary name, checked, and only then
    renamed into place; a download whose bytes do not match (corrupted in transit) is fetched
    again, up to ``download_retry`` times, before the shard fails.
    """

    def prepare_shard(self, shard: Any) -> int:
        """Ensure ``shard`` is local; returns the change in cache usage, bytes."""
        delta = 0
        if self.remote is not None and self.validate_hash:
            for raw_info, zip_info in shard.file_pairs:
                remote_info = zip_info or raw_info  # the file the remote holds
                final = os.path.join(self.local, self.split, remote_info.basename)
                if not os.path.isfile(os.path.join(self.local, self.split, raw_info.basename)) \
                        and not os.path.isfile(final):
                    self._download_verified(remote_info, final)
                    delta += remote_info.bytes
        return delta + super().prepare_shard(shard)

    def _download_verified(self, info: Any, final: str) -> None:
        from streaming.base.hashing import get_hash
        algorithm = self.validate_hash
        if algorithm not in info.hashes:
            raise ValueError(f'{info.basename} records no {algorithm} hash (it has {sorted(info.hashes)})')
        attempts = max(1, self.download_retry)
        url = os.path.join(self.remote, self.split, info.basename)
        for attempt in range(1, attempts + 1):
            # A file left by a killed process under this name is checked like a fresh download.
            unverified = self._download_file(info.basename, f'{info.basename}.unverified')
            with open(unverified, 'rb') as f:
                matches = get_hash(algorithm, f.read()) == info.hashes[algorithm]
            if matches:
                os.replace(unverified, final)
                return
            os.remove(unverified)
            log.warning('%s does not match its %s hash (download %d of %d)', url, algorithm, attempt, attempts)
        raise ValueError(f'{url} does not match its {algorithm} hash ({attempts} downloads)')


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
            ``validate_hash``), and on local shards at build time when ``verify_local=True``.
        download_retry / download_timeout: attempts per remote file (each also retried by the S3 client)
            and seconds per download; a download failing its hash is fetched again, up to download_retry times.
        verify_local: hash-check local shards (no remote) once at build time.
    """

    def __init__(
        self,
        sources: Sequence[DomainSource],
        *,
        validate_hash: str | None = None,
        download_retry: int = 3,
        download_timeout: float = 60,
        verify_local: bool = True,
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

        def make_streams() -> list[Stream]:
            return [VerifiedStream(remote=s.remote, local=s.local, validate_hash=validate_hash,
                                   download_retry=download_retry, download_timeout=download_timeout)
                    for s in self.sources]

        world = World.detect()
        # The streams that fetch the indexes also serve the dataset: each keeps its object-store client.
        streams = make_streams()
        for source, stream in zip(self.sources, streams):
            if source.remote is None:
                index = _check_local_split(source)
                if verify_local:
                    verify_local_shards(source, index)
            try:  # reads (for a remote: fetches) the index only, so that its failures name the domain
                shards = stream.get_shards(world, allow_unsafe_types=True)  # nothing is decoded here
            except Exception as error:
                raise RuntimeError(f"domain '{source.name}': cannot read the MDS index of "
                                   f'{source.remote or source.local}: {error}') from error
            _check_safe_columns(source.name, shards)
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
            seq_lens[name] = _seq_len_of(self.streaming.shards[first_shard]) or len(self[(k, 0)][2])
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
        if 'tokens' not in sample:
            raise KeyError(f"domain '{self.domain_names[domain]}': samples have no 'tokens' column "
                           f'(columns: {sorted(sample)})')
        return domain, index, sample['tokens']

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

        The samples are the next ``num_samples`` of the domain's probe order (see
        :mod:`composer_pike.probe_order`): a fresh pseudo-random permutation of the domain per pass,
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
                'probe_order': self.probe_order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where :meth:`state_dict` was taken (Composer calls this on resume).

        A state without probe cursors (written before probes had an order of their own) starts the
        probe orders from the beginning.
        """
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


class ShardPrefetcher:
    """Downloads the shards each remote domain will read in the next ``horizon`` steps, in threads.

    Only domains whose read position has moved past what was already requested do any work, so the
    per-step cost is one vectorized comparison over K. Prefetching only saves time: a shard that
    fails to download or verify here is logged, kept in ``failed`` (shard id -> error) and handed
    back to the readers (:meth:`MixtureDataset.release_failed_prefetch`), which end the run when,
    and only when, they need it and cannot read it either.
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
        self._in_flight: list[Future] = []

    def after_plan(self, planner: MixturePlanner, counts: np.ndarray) -> None:
        if self.pool is None:
            return
        position = planner.epochs * planner.domain_sizes + planner.cursors  # samples read, all passes
        ahead = position + counts * self.horizon_steps
        stale = np.flatnonzero(self.remote & (ahead > self.requested_until))
        if stale.size:
            self._in_flight = [f for f in self._in_flight if not f.done()]
        for k in stale:
            ids = self.sample_offsets[k] + planner.upcoming_samples(k, int(counts[k]) * self.horizon_steps + 1)
            for shard in np.unique(np.searchsorted(self.shard_starts, ids, side='right') - 1).tolist():
                if shard not in self.requested:
                    self.requested.add(shard)
                    self._in_flight.append(self.pool.submit(self._prepare, shard))
            self.requested_until[k] = ahead[k]

    def wait(self) -> None:
        """Block until every download requested so far has finished or failed."""
        futures_wait(self._in_flight)

    def _prepare(self, shard: int) -> None:
        """Start downloading ``shard``; never wait on a download someone else is doing."""
        try:
            self.dataset.streaming.prepare_shard(shard, blocking=False)
        except Exception as error:
            message = self.dataset.describe_shard_failure(shard, str(error))
            self.failed[shard] = message
            log.warning('prefetch failed, left to the readers: %s', message)
            self.dataset.release_failed_prefetch(shard)


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
