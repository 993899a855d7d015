"""Throughput of the mixture loader against a plain StreamingDataset, locally and from S3 (moto).

    .venv/bin/python benchmarks/loader_throughput.py [--samples 20000] [--batch 32] [--workers 2]

Data: 4 domains of packed uint16 sequences (seq_len 1024), written like pike-prep writes them
(streaming_prep.writer.write_split: zstd, xxh64, ``--shard-mib`` MiB shards before compression).

(a) mixture: MixtureDataset + build_mixture_dataloader (num_workers, prefetch_factor 2).
(b) plain:   one StreamingDataset with one Stream per domain (proportion = the weight),
             shuffle=True, batch_size=B, through a torch DataLoader with the same batch size and
             workers. Both collate into int64 input_ids/labels.
Local runs: shards decompressed once beforehand, ``--warmup`` batches dropped per iterator, then
``--batches`` timed; ``--reps`` repetitions alternating (a) and (b); medians reported.
S3 runs: the same shards uploaded to a ThreadedMotoServer on 127.0.0.1; every repetition uses fresh
local caches and times iterator start to ``--s3-batches`` batches (downloads included).
(d) planning: MixturePlanner.plan_next for K=256 tiny domains and a global batch of 512, with
static weights and with a weight change every 10 steps.
(e) sampler: main-process cost per batch of MixtureBatchSampler (planning + its per-step planner
snapshot) when the weight schedule holds 1, 1000 or 5000 entries (a run updating weights every 10
steps holds 1000 after 10k steps if superseded entries are never dropped), and the JSON size of the
planner state a checkpoint stores.

The last line printed is JSON with the ratios and the raw numbers.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

WEIGHTS = [0.4, 0.3, 0.2, 0.1]
SHARES = [0.4, 0.3, 0.2, 0.1]  # of the samples per domain
SEQ_LEN = 1024
VOCAB = 50257


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_data(root: str, total: int, shard_mib: float, seed: int = 0) -> list[str]:
    from streaming_prep.writer import write_split

    rng = np.random.default_rng(seed)
    dirs = []
    for k, share in enumerate(SHARES):
        n = int(total * share)
        # Token ids with a Zipf-like spread, so zstd sees text-like (partly compressible) data.
        tokens = np.minimum(rng.zipf(1.3, size=(n, SEQ_LEN)), VOCAB - 1).astype(np.uint16)
        out = os.path.join(root, f'd{k}')
        write_split(out, tokens, f'd{k}', compression='zstd', hashes=['xxh64'], size_limit=int(shard_mib * (1 << 20)))
        dirs.append(out)
    return dirs


def decompress_all(dirs: list[str]) -> None:
    """Read one sample of every shard so streaming writes the raw shards once, before timing."""
    from streaming import StreamingDataset

    for d in dirs:
        ds = StreamingDataset(local=d, shuffle=False)
        for offset in ds.sample_offset_per_shard:
            ds[int(offset)]


def collate_plain(samples: list[dict]) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([s['tokens'] for s in samples]).astype(np.int64))
    return {'input_ids': tokens, 'labels': tokens.clone()}


def mixture_loader(sources, args, seed: int, **kwargs):
    from composer_pike.data import MixtureDataset, build_mixture_dataloader

    dataset = MixtureDataset(sources, **kwargs)
    loader = build_mixture_dataloader(dataset, args.batch, weights=WEIGHTS, seed=seed, num_workers=args.workers,
                                      rank=0, world_size=1)
    return dataset, loader


def plain_loader(streams, args, seed: int, **kwargs):
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    dataset = StreamingDataset(streams=streams, shuffle=True, shuffle_seed=seed, batch_size=args.batch, **kwargs)
    loader = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, collate_fn=collate_plain,
                        prefetch_factor=2 if args.workers else None)
    return dataset, loader


def time_batches(loader, warmup: int, batches: int, batch_size: int, include_start: bool = False) -> float:
    """Samples per second over ``batches`` batches after ``warmup`` (or from iterator start)."""
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    if not include_start:
        start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        assert batch['input_ids'].shape == (batch_size, SEQ_LEN)
    elapsed = time.perf_counter() - start
    del iterator
    return batches * batch_size / elapsed


def bench_local(dirs: list[str], args) -> dict:
    from composer_pike.data import DomainSource
    from streaming import Stream

    sources = [DomainSource(f'd{k}', d) for k, d in enumerate(dirs)]
    start = time.perf_counter()
    dataset, _ = mixture_loader(sources, args, 0)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    mixture_loader(sources, args, 0, verify_local=False)
    build_unverified_s = time.perf_counter() - start
    mixture, plain = [], []
    for rep in range(args.reps):
        _, loader = mixture_loader(sources, args, rep, verify_local=False)
        mixture.append(time_batches(loader, args.warmup, args.batches, args.batch))
        streams = [Stream(local=d, proportion=w) for d, w in zip(dirs, WEIGHTS)]  # StreamingDataset mutates them
        _, loader = plain_loader(streams, args, rep)
        plain.append(time_batches(loader, args.warmup, args.batches, args.batch))
        log(f'local rep {rep}: mixture {mixture[-1]:.0f} samples/s, plain {plain[-1]:.0f} samples/s')
    del dataset
    return {'mixture': mixture, 'plain': plain, 'build_s': build_s, 'build_unverified_s': build_unverified_s}


def bench_s3(dirs: list[str], args, workdir: str) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer
    from streaming import Stream

    from composer_pike.data import DomainSource

    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(S3_ENDPOINT_URL=f'http://{host}:{port}', AWS_ACCESS_KEY_ID='bench',
                      AWS_SECRET_ACCESS_KEY='bench', AWS_DEFAULT_REGION='us-east-1')
    import logging
    logging.getLogger('werkzeug').setLevel(logging.ERROR)
    client = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT_URL'])
    client.create_bucket(Bucket='pike-bench')
    remotes = []
    for k, d in enumerate(dirs):
        for name in os.listdir(d):
            if name.endswith('.zstd') or name == 'index.json':  # what pike-prep uploads
                client.upload_file(os.path.join(d, name), 'pike-bench', f'mix/d{k}/{name}')
        remotes.append(f's3://pike-bench/mix/d{k}')
    mixture, plain = [], []
    try:
        for rep in range(args.reps):
            cache = os.path.join(workdir, f's3cache{rep}')
            sources = [DomainSource(f'd{k}', os.path.join(cache, 'mix', f'd{k}'), remote=r)
                       for k, r in enumerate(remotes)]
            _, loader = mixture_loader(sources, args, rep, validate_hash='xxh64')
            mixture.append(time_batches(loader, 0, args.s3_batches, args.batch, include_start=True))
            streams = [Stream(remote=r, local=os.path.join(cache, 'plain', f'd{k}'), proportion=w)
                       for k, (r, w) in enumerate(zip(remotes, WEIGHTS))]
            _, loader = plain_loader(streams, args, rep, validate_hash='xxh64')
            plain.append(time_batches(loader, 0, args.s3_batches, args.batch, include_start=True))
            log(f's3 rep {rep}: mixture {mixture[-1]:.0f} samples/s, plain {plain[-1]:.0f} samples/s')
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        server.stop()
    return {'mixture': mixture, 'plain': plain}


def bench_planner(num_domains: int = 256, batch: int = 512, steps: int = 2000) -> dict:
    from composer_pike.data.planner import MixturePlanner

    rng = np.random.default_rng(0)
    sizes = rng.integers(200, 2000, size=num_domains)
    shard_sizes = [[100] * (n // 100) + ([n % 100] if n % 100 else []) for n in sizes]
    results = {}
    for label, change_every in (('static', 0), ('change_every_10', 10)):
        planner = MixturePlanner(sizes, batch, weights=rng.dirichlet(np.ones(num_domains)), seed=1,
                                 shard_sizes=shard_sizes)
        for _ in range(50):  # warm-up (first pass orders)
            planner.plan_next()
        elapsed = 0.0
        for step in range(steps):
            if change_every and step % change_every == 0:
                planner.schedule_weights(rng.dirichlet(np.ones(num_domains)), planner.step + 1)
            start = time.perf_counter()
            planner.plan_next()
            elapsed += time.perf_counter() - start
        results[label] = elapsed / steps * 1e6
    return results


def bench_sampler_schedule(num_domains: int = 256, batch: int = 512, entries=(1, 1000, 5000), steps: int = 30) -> dict:
    """Main-process cost per batch of MixtureBatchSampler when the weight schedule holds n entries.

    A long PiKE run that updates weights every 10 steps reaches 1000 entries after 10k steps; the
    schedule is filled directly to stand for such a run.
    """
    from composer_pike.data import MixtureBatchSampler
    from composer_pike.data.planner import MixturePlanner

    class Sized:
        def __len__(self) -> int:
            return 10 ** 6

    rng = np.random.default_rng(0)
    sizes = rng.integers(200, 2000, size=num_domains)
    results = {}
    for n in entries:
        planner = MixturePlanner(sizes, batch, seed=1)
        weights = rng.dirichlet(np.ones(num_domains), size=n)
        planner.schedule = [(10 * i, weights[i]) for i in range(n)]
        planner.step = 10 * n
        sampler = MixtureBatchSampler(Sized(), planner, rank=0, world_size=1, steps_per_epoch=10 ** 9, delay=0,
                                      prefetch_steps=0)
        sampler.consumed = planner.step
        iterator = iter(sampler)
        next(iterator)
        sampler.mark_consumed()
        start = time.perf_counter()
        for _ in range(steps):
            next(iterator)
            sampler.mark_consumed()
        results[n] = (time.perf_counter() - start) / steps * 1e6
        state = json.dumps(sampler.planner.state_dict())
        results[f'{n}_state_mib'] = len(state) / 2 ** 20
    return results


def profile_mixture(dirs: list[str], args, remote: bool = False) -> str:
    """cProfile of the mixture loader in-process (num_workers=0), top functions by cumulative time."""
    from composer_pike.data import DomainSource

    sources = [DomainSource(f'd{k}', d) for k, d in enumerate(dirs)]
    profile_args = argparse.Namespace(**{**vars(args), 'workers': 0})
    _, loader = mixture_loader(sources, profile_args, 99, verify_local=False)
    profiler = cProfile.Profile()
    profiler.enable()
    time_batches(loader, 2, args.batches, args.batch)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats('cumulative').print_stats(25)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samples', type=int, default=20000)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--shard-mib', type=float, default=2.0)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--batches', type=int, default=100)
    parser.add_argument('--s3-batches', type=int, default=100)
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--skip-s3', action='store_true')
    parser.add_argument('--profile', action='store_true', help='always print the cProfile of the mixture loader')
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # streaming keeps descriptors per dataset
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    workdir = tempfile.mkdtemp(prefix='pike-loader-bench-')
    try:
        start = time.perf_counter()
        dirs = write_data(os.path.join(workdir, 'data'), args.samples, args.shard_mib)
        raw = sum(os.path.getsize(os.path.join(d, f)) for d in dirs for f in os.listdir(d) if f.endswith('.zstd'))
        shards = sum(len(json.load(open(os.path.join(d, 'index.json')))['shards']) for d in dirs)
        log(f'wrote {args.samples} samples in {shards} shards ({raw / 2**20:.1f} MiB zstd) '
            f'in {time.perf_counter() - start:.1f} s')
        decompress_all(dirs)

        local = bench_local(dirs, args)
        s3 = None if args.skip_s3 else bench_s3(dirs, args, workdir)
        planning = bench_planner()
        sampler = bench_sampler_schedule()

        result = {
            'mixture_vs_plain': statistics.median(local['mixture']) / statistics.median(local['plain']),
            'mixture_vs_plain_s3': (statistics.median(s3['mixture']) / statistics.median(s3['plain'])) if s3 else None,
            'k256_plan_us_per_batch': planning['static'],
            'k256_plan_us_per_batch_change_every_10': planning['change_every_10'],
            'k256_sampler_us_per_batch_by_schedule_entries': {n: sampler[n] for n in (1, 1000, 5000)},
            'k256_state_json_mib_by_schedule_entries': {n: round(sampler[f'{n}_state_mib'], 2)
                                                        for n in (1, 1000, 5000)},
            'local_mixture_samples_per_s': statistics.median(local['mixture']),
            'local_plain_samples_per_s': statistics.median(local['plain']),
            's3_mixture_samples_per_s': statistics.median(s3['mixture']) if s3 else None,
            's3_plain_samples_per_s': statistics.median(s3['plain']) if s3 else None,
            'local_mixture_reps': [round(x) for x in local['mixture']],
            'local_plain_reps': [round(x) for x in local['plain']],
            's3_mixture_reps': [round(x) for x in s3['mixture']] if s3 else None,
            's3_plain_reps': [round(x) for x in s3['plain']] if s3 else None,
            'mixture_build_s_verify_local': local['build_s'],
            'mixture_build_s_no_verify': local['build_unverified_s'],
            'config': {'samples': args.samples, 'seq_len': SEQ_LEN, 'batch': args.batch, 'workers': args.workers,
                       'shards': shards, 'shard_mib': args.shard_mib, 'zstd_mib': round(raw / 2**20, 1),
                       'weights': WEIGHTS, 'reps': args.reps, 'batches': args.batches,
                       's3_batches': args.s3_batches, 'torch_threads': torch.get_num_threads(),
                       'cpus': os.cpu_count()},
        }
        slow = result['mixture_vs_plain'] < 0.95 or (s3 is not None and result['mixture_vs_plain_s3'] < 0.9)
        if slow or args.profile:
            log(profile_mixture(dirs, args))
        print(json.dumps(result))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
