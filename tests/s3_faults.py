"""An HTTP proxy on 127.0.0.1 that injects object-store faults in front of a moto S3 server.

Point ``S3_ENDPOINT_URL`` at :attr:`FaultyS3Proxy.endpoint_url` and every request reaches moto
through it. For each GET of an object the proxy decides, from a hash of ``(seed, key, n)`` for the
key's n-th GET (so the decisions do not depend on which thread asks first), whether to answer

    error   500 InternalError or 503 SlowDown (alternately), without asking moto
    slow    moto's answer after ``slow_seconds``
    drop    moto's headers and half its body, then the connection is closed
    corrupt moto's answer with one byte of the body flipped (Content-Length unchanged)

with probabilities ``error_rate``, ``slow_rate``, ``drop_rate`` and ``corrupt_rate``. Only keys
ending in one of ``corruptible`` (shard files) are corrupted: streaming records no hash of an
index, so nothing could tell a flipped digit there from the truth. Unless ``checksums``, the
store's ``x-amz-checksum-*`` headers are withheld, as from a store without flexible checksums (or
an object uploaded without one): the client then cannot catch a flipped byte itself, and only the
shard hash check does. At most
``max_consecutive`` faults in a row hit one key, so a client that retries gets through. Keys
ending in one of ``unavailable`` are answered 503 to every GET and HEAD, for good. ``counts``
records what was done (per fault kind, plus ``ok``).

:func:`flaky_read` and :func:`unavailable_read` are the scenarios tests/test_s3_faults.py asserts on
and benchmarks/fault_matrix.py counts: three small MDS domains on S3 read through the proxy by the
mixture loader.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from mds_helpers import sample_tokens, write_domain

from composer_pike.data import DomainSource, MixtureDataset, build_mixture_dataloader

ERROR_BODIES = {
    500: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
         b'<Message>injected fault</Message></Error>',
    503: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
         b'<Message>injected fault</Message></Error>',
}
HOP_BY_HOP = {'connection', 'keep-alive', 'transfer-encoding', 'content-length', 'server', 'date'}


@dataclass(frozen=True)
class FaultPlan:
    """What fraction of object GETs fail, and how (see the module docstring)."""

    error_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.5
    drop_rate: float = 0.0
    corrupt_rate: float = 0.0
    max_consecutive: int = 2
    unavailable: tuple[str, ...] = ()
    corruptible: tuple[str, ...] = ('.mds', '.mds.zstd')
    checksums: bool = False
    seed: int = 0

    def fault_for(self, key: str, attempt: int) -> str | None:
        """The fault for the ``attempt``-th GET (0-based) of ``key``, or None to answer normally."""
        digest = hashlib.blake2b(f'{self.seed}/{key}/{attempt}'.encode(), digest_size=8).digest()
        u = int.from_bytes(digest, 'big') / 2**64
        for kind, rate in (('error', self.error_rate), ('drop', self.drop_rate),
                           ('corrupt', self.corrupt_rate), ('slow', self.slow_rate)):
            if u < rate:
                return None if kind == 'corrupt' and not key.endswith(self.corruptible) else kind
            u -= rate
        return None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Connections closed by either side (a dropped fault, a client giving up, moto stopping) are expected."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FaultyS3Proxy:
    """Forwards to ``upstream`` (``http://host:port``) with :class:`FaultPlan` faults; a context manager."""

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        self.upstream = urlsplit(upstream)
        self.plan = plan
        self.counts: Counter[str] = Counter()
        self.gets: Counter[str] = Counter()   # GETs seen per key
        self.get_log: dict[str, list[str]] = {}  # per key, each GET: client port, time, fault, and a failure
        self._started = time.monotonic()
        self._streak: Counter[str] = Counter()  # consecutive faults per key
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_GET(self) -> None:
                try:
                    proxy._handle(self)
                except OSError as error:  # the connection to the client or to moto broke: the client retries
                    if hasattr(self, 'get_entry'):
                        with proxy._lock:
                            key, index = self.get_entry
                            proxy.get_log[key][index] += f', failed: {error!r}'
                    raise

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

            def log_message(self, *args) -> None:
                pass

        self.server = _QuietServer(('127.0.0.1', 0), Handler)
        self.endpoint_url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self._thread = threading.Thread(target=self.server.serve_forever, name='faulty-s3', daemon=True)

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, method: str, key: str) -> str | None:
        if key.endswith(self.plan.unavailable):  # False for an empty tuple
            return 'unavailable'
        if method != 'GET' or not key:
            return None
        with self._lock:
            fault = self.plan.fault_for(key, self.gets[key])
            self.gets[key] += 1
            if fault is not None and self._streak[key] >= self.plan.max_consecutive:
                fault = None
            self._streak[key] = self._streak[key] + 1 if fault else 0
        return fault

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get('Content-Length') or 0)
        body = request.rfile.read(length) if length else b''
        key = urlsplit(request.path).path.lstrip('/').partition('/')[2]  # path-style: /bucket/key
        fault = self._decide(request.command, key)
        if request.command == 'GET' and key:
            with self._lock:
                entries = self.get_log.setdefault(key, [])
                request.get_entry = (key, len(entries))
                entries.append(f'port {request.client_address[1]} at {time.monotonic() - self._started:.3f} s, '
                               f'{fault or "ok"}')
        with self._lock:
            self.counts[fault or 'ok'] += 1
            errors = self.counts['error']
        if fault in ('error', 'unavailable'):
            status = 503 if fault == 'unavailable' or errors % 2 else 500
            payload = ERROR_BODIES[status] if request.command != 'HEAD' else b''
            request.send_response(status)
            request.send_header('Content-Type', 'application/xml')
            request.send_header('Content-Length', str(len(ERROR_BODIES[status])))
            request.end_headers()
            request.wfile.write(payload)
            return
        if fault == 'slow':
            time.sleep(self.plan.slow_seconds)
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ('connection', 'keep-alive')}
            upstream.request(request.command, request.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            response_headers = response.getheaders()
            status = response.status
        finally:
            upstream.close()
        if fault == 'corrupt' and payload:
            payload = payload[:len(payload) // 2] + bytes([payload[len(payload) // 2] ^ 0xFF]) + \
                payload[len(payload) // 2 + 1:]
        request.send_response(status)
        for name, value in response_headers:
            withheld = name.lower().startswith('x-amz-checksum') and not self.plan.checksums
            if name.lower() not in HOP_BY_HOP and not withheld:
                request.send_header(name, value)
        declared = dict((k.lower(), v) for k, v in response_headers).get('content-length', str(len(payload)))
        request.send_header('Content-Length', declared if request.command == 'HEAD' else str(len(payload)))
        request.end_headers()
        if request.command == 'HEAD':
            return
        if fault == 'drop':
            request.wfile.write(payload[:len(payload) // 2])
            request.wfile.flush()
            request.close_connection = True
            request.connection.shutdown(socket.SHUT_RDWR)
            return
        request.wfile.write(payload)


# ------------------------------------------------------------------------------------- moto

S3_TEST_ENV = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing', 'AWS_DEFAULT_REGION': 'us-east-1'}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server (server mode, so other processes reach it) on 127.0.0.1 for the block; yields its
    endpoint URL. Its per-request log lines are silenced meanwhile. Credentials: :data:`S3_TEST_ENV`."""
    import logging

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    request_log = logging.getLogger('werkzeug')
    level = request_log.level
    request_log.setLevel(logging.WARNING)
    try:
        host, port = server.get_host_and_port()
        yield f'http://{host}:{port}'
    finally:
        server.stop()
        request_log.setLevel(level)


def s3_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for ``endpoint_url`` with the :data:`S3_TEST_ENV` credentials."""
    import boto3

    return boto3.client('s3', endpoint_url=endpoint_url, region_name=S3_TEST_ENV['AWS_DEFAULT_REGION'],
                        aws_access_key_id=S3_TEST_ENV['AWS_ACCESS_KEY_ID'],
                        aws_secret_access_key=S3_TEST_ENV['AWS_SECRET_ACCESS_KEY'])


# ------------------------------------------------------------------------------------- scenarios

SEQ_LEN = 16
SIZES = (40, 30, 20)  # samples per domain, in shards of 5
BATCH = 9
STEPS = 8  # 72 samples: every domain's first pass and the start of a second for the smallest
FLAKY = FaultPlan(error_rate=0.2, drop_rate=0.15, corrupt_rate=0.15, slow_rate=0.1, slow_seconds=0.3, seed=3)


@contextlib.contextmanager
def s3_endpoint(url: str) -> Iterator[None]:
    """``S3_ENDPOINT_URL`` set to ``url`` inside the block (streaming's S3 clients read it)."""
    previous = os.environ.get('S3_ENDPOINT_URL')
    os.environ['S3_ENDPOINT_URL'] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop('S3_ENDPOINT_URL')
        else:
            os.environ['S3_ENDPOINT_URL'] = previous


def upload_domains(client: Any, root: Path, bucket: str) -> list[str]:
    """Writes SIZES samples per domain under ``root/data`` (d0 uncompressed, d1 and d2 zstd, pike-prep's
    default) and uploads them to ``s3://bucket/mix/d<k>``; returns those remotes."""
    client.create_bucket(Bucket=bucket)
    remotes = []
    for k, size in enumerate(SIZES):
        local = write_domain(str(root / 'data' / f'd{k}'), k, size, seq_len=SEQ_LEN, samples_per_shard=5,
                             compression=None if k == 0 else 'zstd')
        for path in sorted(Path(local).iterdir()):
            client.upload_file(str(path), bucket, f'mix/d{k}/{path.name}')
        remotes.append(f's3://{bucket}/mix/d{k}')
    return remotes


def read_steps(dataset: MixtureDataset, num_workers: int, steps: int = STEPS) -> list[list[tuple[int, int]]]:
    """The (domain, sample id) pairs of ``steps`` batches; AssertionError if a sample's tokens are not
    those mds_helpers wrote for it."""
    loader = build_mixture_dataloader(dataset, BATCH, weights=[0.4, 0.35, 0.25], num_workers=num_workers,
                                      rank=0, world_size=1, seed=11)
    batches = []
    for batch in loader:
        pairs = list(zip(batch['domain'].tolist(), batch['sample_id'].tolist()))
        for row, (domain, index) in enumerate(pairs):
            if not np.array_equal(batch['input_ids'][row].numpy(), sample_tokens(domain, index, SEQ_LEN)):
                raise AssertionError(f'domain {domain} sample {index} has the wrong tokens')
        batches.append(pairs)
        if len(batches) == steps:
            return batches
    raise AssertionError(f'the loader ended after {len(batches)} batches')


def in_thread(function: Callable[[], Any], timeout: float) -> dict[str, Any]:
    """``function()`` in a daemon thread: ``{'value': ...}``, ``{'error': ...}`` or ``{'hung': timeout}``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome['value'] = function()
        except BaseException as error:  # noqa: BLE001 - reported to the caller
            outcome['error'] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome if not thread.is_alive() else {'hung': timeout}


def flaky_read(workdir: Path, client: Any, upstream: str, num_workers: int, plan: FaultPlan = FLAKY,
               timeout: float = 240) -> dict[str, Any]:
    """Reads STEPS batches from S3 through ``plan``'s faults and from the local copies without any.

    Returns ``{'expected', 'outcome', 'counts', 'gets', 'get_log'}``: the fault-free batches, :func:`in_thread`'s
    outcome of the faulty read, the proxy's fault counts, its GETs per object key and, per key, which client
    connection asked when.
    """
    remotes = upload_domains(client, workdir, f'pike-flaky-{num_workers}')
    local = MixtureDataset([DomainSource(f'd{k}', str(workdir / 'data' / f'd{k}')) for k in range(len(SIZES))])
    expected = read_steps(local, num_workers=0)
    sources = [DomainSource(f'd{k}', str(workdir / 'cache' / f'd{k}'), remote=remote)
               for k, remote in enumerate(remotes)]
    with FaultyS3Proxy(upstream, plan) as proxy, s3_endpoint(proxy.endpoint_url):
        outcome = in_thread(lambda: read_steps(MixtureDataset(sources, validate_hash='xxh64', download_retry=3,
                                                              download_timeout=10), num_workers), timeout)
    return {'expected': expected, 'outcome': outcome, 'counts': proxy.counts, 'gets': proxy.gets,
            'get_log': proxy.get_log}


def unavailable_read(workdir: Path, client: Any, upstream: str, needed: bool, timeout: float = 240) -> dict[str, Any]:
    """Reads STEPS batches from S3 with 10% of GETs failing and one shard of d1 ('forums') answered 503
    for good: a shard the read ``needed`` (it holds samples the fault-free read yields), or one that
    the prefetcher asks for (it lies in forums' first pass) but the read never reaches.

    Returns ``{'outcome', 'expected', 'counts', 'remote', 'shard', 'cached', 'prefetch_failed'}``:
    :func:`in_thread`'s outcome, the fault-free batches, the proxy's counts, the domain's remote, the
    shard's remote file name, what of it reached the cache and the prefetcher's errors, taken after
    its downloads in flight have ended.
    """
    remotes = upload_domains(client, workdir, f'pike-unavailable-{"needed" if needed else "unneeded"}')
    names = ['web', 'forums', 'books']
    local = MixtureDataset([DomainSource(name, str(workdir / 'data' / f'd{k}')) for k, name in enumerate(names)])
    expected = read_steps(local, num_workers=0)
    read = {index for batch in expected for domain, index in batch if domain == 1}
    with open(workdir / 'data' / 'd1' / 'index.json') as f:
        shards = json.load(f)['shards']
    starts = np.cumsum([0] + [s['samples'] for s in shards])
    candidates = [s['zip_data']['basename'] for s, a, b in zip(shards, starts, starts[1:])
                  if bool(read & set(range(a, b))) == needed]
    shard = candidates[len(candidates) // 2]  # one read in mid-run (or skipped), not at the start
    plan = FaultPlan(error_rate=0.1, seed=5, unavailable=(f'mix/d1/{shard}',))
    sources = [DomainSource(name, str(workdir / 'cache' / name), remote=remote) for name, remote in zip(names, remotes)]
    with FaultyS3Proxy(upstream, plan) as proxy, s3_endpoint(proxy.endpoint_url):
        dataset = MixtureDataset(sources, validate_hash='xxh64', download_retry=2, download_timeout=5)
        outcome = in_thread(lambda: read_steps(dataset, num_workers=2), timeout)
        prefetcher = dataset.sampler.prefetcher
        in_thread(prefetcher.wait, timeout)
    cached = sorted(p.name for p in (workdir / 'cache' / 'forums').iterdir() if p.name.startswith(shard))
    return {'outcome': outcome, 'expected': expected, 'counts': proxy.counts, 'remote': remotes[1], 'shard': shard,
            'cached': cached, 'prefetch_failed': sorted(prefetcher.failed.values())}
