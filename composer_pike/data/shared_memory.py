"""Building StreamingDatasets side by side: a host-wide set-up lock and the cleanup of crashed runs' shared memory."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import tempfile
import time
from typing import Any, Callable, Iterator

import torch
from streaming import Stream

log = logging.getLogger(__name__)

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
