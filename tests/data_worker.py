"""One rank of a multi-process run of the mixture data path (launched by tests/test_data.py).

Run under Composer's launcher, e.g.::

    python -m composer.cli.launcher -n 2 --master_port P tests/data_worker.py \
        --out OUT --batch 8 --steps 12 --change-after 3 --new-weights 0.1,0.1,0.8 DIR0 DIR1 DIR2

Every rank initialises Composer dist (gloo on CPU), builds a MixtureDataset over the domain
directories (read directly, or with ``--cache-root`` as *remotes* copied into a per-node local
cache), builds the loader with rank/world size taken from Composer dist, iterates ``--steps``
batches (calling ``set_weights`` once after ``--change-after``) and writes
``OUT/rank{R}.json``: per step the (domain, sample_id) lists of its slice, whether every row's
tokens matched its (domain, sample_id), and the final dataset state.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import sys

import time

import numpy as np

T0 = time.time()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mds_helpers import sample_tokens  # noqa: E402


def log(message: str) -> None:
    print(f'[data_worker pid {os.getpid()} +{time.time() - T0:.1f}s] {message}', file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    parser.add_argument('--batch', type=int, default=8, help='global batch size')
    parser.add_argument('--steps', type=int, default=12)
    parser.add_argument('--num-workers', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--weights', default=None, help='initial weights, comma separated')
    parser.add_argument('--change-after', type=int, default=-1, help='set_weights(after_step=...) here')
    parser.add_argument('--new-weights', default=None)
    parser.add_argument('--cache-root', default=None,
                        help='read the dirs as remotes, cached under CACHE_ROOT/d{k} (one root per node)')
    parser.add_argument('dirs', nargs='+')
    args = parser.parse_args()

    log('start')
    from composer.utils import dist, get_device

    dist.initialize_dist(get_device('cpu'), timeout=180)
    rank, world = dist.get_global_rank(), dist.get_world_size()
    log(f'dist ready: rank {rank} of {world}')

    from composer_pike.data import DomainSource, MixtureDataset, build_mixture_dataloader

    if args.cache_root:
        sources = [DomainSource(f'd{k}', os.path.join(args.cache_root, f'd{k}'), remote=d)
                   for k, d in enumerate(args.dirs)]
    else:
        sources = [DomainSource(f'd{k}', d) for k, d in enumerate(args.dirs)]
    dataset = MixtureDataset(sources, validate_hash='xxh64' if args.cache_root else None)
    weights = [float(x) for x in args.weights.split(',')] if args.weights else None
    loader = build_mixture_dataloader(dataset, args.batch, weights=weights, seed=args.seed,
                                      num_workers=args.num_workers)

    log('loader built')
    steps, tokens_ok, effective = [], True, None
    while len(steps) < args.steps:
        before = len(steps)
        batches = iter(loader)
        for batch in batches:
            domains = batch['domain'].tolist()
            ids = batch['sample_id'].tolist()
            for row, (d, i) in enumerate(zip(domains, ids)):
                expected = sample_tokens(d, i, dataset.seq_len).astype(np.int64)
                tokens_ok &= bool(np.array_equal(batch['input_ids'][row].numpy(), expected))
            steps.append({'domain': domains, 'sample_id': ids})
            step = len(steps) - 1
            if step == args.change_after:
                effective = dataset.set_weights([float(x) for x in args.new_weights.split(',')], after_step=step)
            if len(steps) == args.steps:
                break
        batches.close()  # shuts the DataLoader workers down now rather than at interpreter exit
        if len(steps) == before:  # the mixture has ended (on_exhausted='stop')
            break
    log(f'{len(steps)} steps')

    result = {
        'rank': rank,
        'world_size': world,
        'node_rank': int(os.environ.get('NODE_RANK', 0)),
        'local_world_size': int(os.environ.get('LOCAL_WORLD_SIZE', world)),
        'delay': dataset.delay,
        'effective_step': effective,
        'steps': steps,
        'tokens_ok': tokens_ok,
        'domain_sizes': dataset.domain_sizes.tolist(),
        'state': dataset.state_dict(0, True),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)
    log('wrote result')
    dist.barrier()
    log('done')
    # Interpreter finalization (torch, gloo) takes several seconds on a busy 2-core machine; run the
    # atexit hooks (streaming unlinks its shared memory there) and leave without it.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == '__main__':
    main()
