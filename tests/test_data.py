"""The mixture data path (composer_pike.data) on real MDS shards, local, on S3 (moto) and multi-process.

Every sample's tokens encode its (domain, index) (tests/mds_helpers.py), so each batch is checked
against its own contents as well as against the plan. Plans are compared with a
:class:`MixturePlanner` built from the shard sizes read from index.json (the planner's counts
are checked against an independent largest-remainder oracle in test_planner.py).

Multi-process tests run tests/data_worker.py under Composer's launcher (gloo, CPU): two ranks on
one node, and two one-rank "nodes" on this machine. Streaming names its shared memory per host,
so two simulated nodes on one host would collide there (and in streaming's stale-memory cleanup);
each simulated node therefore gets a private /dev/shm (``unshare --mount``) and its own TMPDIR, as
two real hosts would have. Where that is not permitted the two-node test is skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from composer_pike.data import (DomainSource, MixtureDataset, build_mixture_dataloader, read_manifest,
                                sources_from_manifest)
from composer_pike.data.planner import MixturePlanner
from launch_helpers import free_port
from mds_helpers import sample_tokens, write_domain, write_domains

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZES = [95, 40, 23]  # shards of 10 samples: 10, 4 and 3 shards
SEQ_LEN = 16
BATCH = 8
SEED = 17
W0 = [0.5, 0.3, 0.2]  # counts per batch of 8: [4, 2, 2]
W1 = [0.1, 0.1, 0.8]  # [1, 1, 6]
W2 = [0.25, 0.5, 0.25]  # [2, 4, 2]
COUNTS = {tuple(W0): [4, 2, 2], tuple(W1): [1, 1, 6], tuple(W2): [2, 4, 2]}
N_STEPS = 26  # more than one epoch: steps_per_epoch = 158 // 8 = 19
LAUNCH_TIMEOUT = 600


# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory) -> list[str]:
    return write_domains(str(tmp_path_factory.mktemp('mds')), SIZES, seq_len=SEQ_LEN)


@pytest.fixture(scope='module')
def mixture(data_dirs) -> MixtureDataset:
    """One MixtureDataset over the test domains, given a fresh loader (planner, sampler) by each test.

    Datasets are shared because streaming (0.13) leaks file descriptors on every StreamingDataset
    construction (each MixtureDataset builds one), in proportion to the shared-memory prefixes
    alive on the host.
    """
    return open_mixture(data_dirs)


@pytest.fixture(scope='module')
def other_mixture(data_dirs) -> MixtureDataset:
    return open_mixture(data_dirs)


def shard_sizes(directory: str) -> list[int]:
    with open(os.path.join(directory, 'index.json')) as f:
        return [shard['samples'] for shard in json.load(f)['shards']]


def shard_files(directory: str) -> list[str]:
    with open(os.path.join(directory, 'index.json')) as f:
        return [shard['raw_data']['basename'] for shard in json.load(f)['shards']]


def shards_of(directory: str, ids) -> set[int]:
    offsets = np.concatenate(([0], np.cumsum(shard_sizes(directory))[:-1]))
    return set((np.searchsorted(offsets, np.asarray(list(ids)), side='right') - 1).tolist())


def open_mixture(dirs, **kwargs) -> MixtureDataset:
    return MixtureDataset([DomainSource(f'd{k}', d) for k, d in enumerate(dirs)], **kwargs)


def build(dataset: MixtureDataset, num_workers: int = 2, **kwargs):
    kwargs.setdefault('weights', W0)
    kwargs.setdefault('seed', SEED)
    return build_mixture_dataloader(dataset, BATCH, num_workers=num_workers, rank=0, world_size=1, **kwargs)


def check_batch(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Assert the tokens of every row belong to its (domain, sample_id); return those pairs."""
    for key in ('input_ids', 'labels', 'domain', 'sample_id'):
        assert batch[key].dtype == torch.int64, key
    domains, ids = batch['domain'].tolist(), batch['sample_id'].tolist()
    expected = np.stack([sample_tokens(d, i, SEQ_LEN) for d, i in zip(domains, ids)]).astype(np.int64)
    assert torch.equal(batch['input_ids'], torch.from_numpy(expected)), (domains, ids)
    assert torch.equal(batch['labels'], batch['input_ids'])
    return list(zip(domains, ids))


def take(loader, dataset: MixtureDataset, n: int, changes: dict | None = None, tokens: list | None = None):
    """Up to ``n`` batches from ``loader`` (crossing epochs) as lists of (domain, sample_id).

    ``changes[t] = w`` calls ``set_weights(w, after_step=t)`` right after the trainer received
    global step t (as PiKE does at BATCH_END). Stops early when an epoch yields nothing.
    """
    changes = changes or {}
    steps = []
    while len(steps) < n:
        before = len(steps)
        batches = iter(loader)
        for batch in batches:
            steps.append(check_batch(batch))
            if tokens is not None:
                tokens.append(batch['input_ids'].clone())
            step = dataset.sampler.consumed - 1
            if step in changes:
                dataset.set_weights(changes[step], after_step=step)
            if len(steps) == n:
                break
        batches.close()
        if len(steps) == before:
            break
    return steps


def reference_plan(dirs, n: int, weights=W0, seed: int = SEED, schedule=(), **kwargs):
    """The first ``n`` global batches a single planner makes; ``schedule`` = [(effective_step, w)]."""
    sizes = [shard_sizes(d) for d in dirs]
    planner = MixturePlanner([sum(s) for s in sizes], BATCH, weights=weights, seed=seed, shard_sizes=sizes, **kwargs)
    for effective, w in schedule:
        planner.schedule_weights(w, effective)
    plan = []
    for _ in range(n):
        batch = planner.plan_next()
        if batch is None:
            break
        plan.append(list(zip(batch.domains.tolist(), batch.indices.tolist())))
    return plan


def counts_of(step: list[tuple[int, int]]) -> list[int]:
    return np.bincount([d for d, _ in step], minlength=len(SIZES)).tolist()


# ---- batches, counts and the effective-step rule -----------------------------------------------


@pytest.mark.parametrize('num_workers', [0, 2])
def test_batches_follow_the_plan_and_carry_their_samples_tokens(data_dirs, mixture, num_workers):
    dataset = mixture
    assert dataset.domain_sizes.tolist() == SIZES and dataset.seq_len == SEQ_LEN and len(dataset) == sum(SIZES)
    loader = build(dataset, num_workers=num_workers)
    assert len(loader) == sum(SIZES) // BATCH
    steps = take(loader, dataset, len(loader))
    assert steps == reference_plan(data_dirs, len(loader))
    for step, items in enumerate(steps):
        assert counts_of(items) == COUNTS[tuple(W0)] == dataset.counts_at(step).tolist()
        assert [d for d, _ in items] == sorted(d for d, _ in items)


@pytest.mark.parametrize('num_workers, prefetch_factor, delay, expected_delay', [
    (2, 2, None, 4),  # the look-ahead: 2 workers x prefetch 2
    (2, 2, 6, 6),  # a longer delay than the look-ahead is allowed
    (1, 3, None, 3),
    (0, None, None, 0),  # no workers: the next step already uses the new weights
])
def test_weights_take_effect_exactly_at_after_step_plus_one_plus_delay(data_dirs, mixture, num_workers,
                                                                       prefetch_factor, delay, expected_delay):
    dataset = mixture
    loader = build_mixture_dataloader(dataset, BATCH, weights=W0, seed=SEED, num_workers=num_workers,
                                      prefetch_factor=prefetch_factor, delay=delay, rank=0, world_size=1)
    assert dataset.delay == expected_delay
    t = 3
    effective = t + 1 + expected_delay
    steps, batches = [], iter(loader)
    for batch in batches:
        steps.append(check_batch(batch))
        step = dataset.sampler.consumed - 1
        if step == t:
            planned = dataset.planner.step
            assert dataset.set_weights(W1, after_step=t) == effective
            # Whatever the loader had planned ahead lies before the effective step.
            assert t + 1 <= planned <= effective
            np.testing.assert_allclose(dataset.weights_at(effective - 1), W0)
            np.testing.assert_allclose(dataset.weights_at(effective), W1)
        if len(steps) == effective + 3:
            break
    batches.close()
    counts = [counts_of(items) for items in steps]
    assert counts[:effective] == [COUNTS[tuple(W0)]] * effective
    assert counts[effective:] == [COUNTS[tuple(W1)]] * 3
    assert steps == reference_plan(data_dirs, len(steps), schedule=[(effective, W1)])


def test_a_delay_shorter_than_the_loader_lookahead_is_refused(mixture):
    dataset = mixture
    with pytest.raises(ValueError, match='delay'):
        build_mixture_dataloader(dataset, BATCH, num_workers=2, prefetch_factor=2, delay=3, rank=0, world_size=1)
    with pytest.raises(ValueError, match='delay'):
        build_mixture_dataloader(dataset, BATCH, num_workers=1, prefetch_factor=4, delay=0, rank=0, world_size=1)


# ---- resumption ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def uninterrupted(data_dirs, mixture):
    """N_STEPS batches of an uninterrupted loader (2 workers) with the given weight changes."""
    cache = {}

    def run(changes: dict) -> list:
        key = tuple(sorted((step, tuple(w)) for step, w in changes.items()))
        if key not in cache:
            steps = take(build(mixture), mixture, N_STEPS, changes)
            schedule = [(step + 1 + mixture.delay, w) for step, w in sorted(changes.items())]
            assert steps == reference_plan(data_dirs, N_STEPS, schedule=schedule)
            cache[key] = steps
        return cache[key]

    return run


RESUME_CASES = {
    # changes {after_step: weights}, checkpoint step s (batches the trainer had taken)
    'change-scheduled-not-yet-effective': ({5: W1}, 8),  # effective at 5 + 1 + 4 = 10
    'change-already-effective': ({5: W1}, 13),
    'in-the-second-epoch': ({5: W1}, 22),
    'two-changes-inside-the-lookahead': ({5: W1, 6: W2}, 8),  # effective at 10 and 11
}


@pytest.mark.parametrize('case', list(RESUME_CASES))
def test_resume_from_state_dict_in_a_new_dataset_matches_the_uninterrupted_run(data_dirs, mixture, uninterrupted,
                                                                              case):
    changes, s = RESUME_CASES[case]
    reference = uninterrupted(changes)
    first = take(build(mixture), mixture, s, changes)
    assert mixture.planner.step > s  # the loader had planned batches the trainer never took
    state = json.loads(json.dumps(mixture.state_dict(s * BATCH, True)))  # as a checkpoint stores it
    build(mixture)  # the old loader and planner are gone

    resumed = open_mixture(data_dirs)  # a new dataset over the same data, as after a restart
    loader = build(resumed)
    resumed.load_state_dict(state)
    rest = take(loader, resumed, N_STEPS - s, {t: w for t, w in changes.items() if t >= s})
    steps = first + rest
    assert len(steps) == N_STEPS
    for step, (got, want) in enumerate(zip(steps, reference)):
        assert got == want, f'step {step} (resumed at {s})'


def test_resume_refuses_another_seed_or_other_domains(data_dirs, mixture):
    """The cursors index the checkpoint's domains and shuffles: another seed, the domains in another order
    or a domain of another size would resume into other samples, so the load names what differs."""
    take(build(mixture), mixture, 3)
    state = json.loads(json.dumps(mixture.state_dict(3 * BATCH, True)))
    other_seed = open_mixture(data_dirs)
    build(other_seed, seed=SEED + 1)
    with pytest.raises(ValueError, match=f"seed: checkpoint {SEED}, this run {SEED + 1}"):
        other_seed.load_state_dict(state)
    reordered = MixtureDataset([DomainSource(f'd{k}', data_dirs[k]) for k in reversed(range(len(data_dirs)))])
    build(reordered)
    with pytest.raises(ValueError, match="domains: checkpoint \\['d0'.*this run \\['d2'") as error:
        reordered.load_state_dict(state)
    assert 'samples: checkpoint' in str(error.value)
    same = open_mixture(data_dirs)
    build(same)
    same.load_state_dict(state)  # the same data and seed resume
    del state['mixture']  # a checkpoint from before the check
    same.load_state_dict(state)


ABANDON_CASES = {
    'change-scheduled-not-yet-effective': ({5: W1}, 7),
    'change-already-effective': ({5: W1}, 12),
    'two-changes-inside-the-lookahead': ({5: W1, 6: W2}, 8),
}


@pytest.mark.parametrize('case', list(ABANDON_CASES))
def test_an_abandoned_iterator_is_continued_without_skipped_or_repeated_samples(mixture, uninterrupted, case):
    changes, k = ABANDON_CASES[case]
    reference = uninterrupted(changes)
    dataset = mixture
    loader = build(dataset)
    first, abandoned = [], iter(loader)
    for batch in abandoned:
        first.append(check_batch(batch))
        step = dataset.sampler.consumed - 1
        if step in changes:
            dataset.set_weights(changes[step], after_step=step)
        if len(first) == k:
            break
    assert dataset.planner.step > k  # the look-ahead planned more than the trainer took
    rest = take(loader, dataset, N_STEPS - k, {t: w for t, w in changes.items() if t >= k})
    steps = first + rest
    assert len(steps) == N_STEPS
    for step, (got, want) in enumerate(zip(steps, reference)):
        assert got == want, f'step {step} (iterator abandoned after {k})'
    del abandoned


def test_checkpoint_state_does_not_grow_with_the_number_of_weight_updates(data_dirs, mixture):
    """PiKE may update weights every step; the state holds what the trainer's position still needs.

    Entries superseded before the trainer's position can never be used again (rewinds and resumes
    go back to that position at most), so at most the entry in force there plus the ones scheduled
    inside the look-ahead remain: delay + 2 with one update per step.
    """
    rng = np.random.default_rng(0)
    updates = {t: rng.dirichlet(np.ones(len(SIZES))).tolist() for t in range(30)}
    steps = take(build(mixture), mixture, 30, updates)
    schedule = [(t + 1 + mixture.delay, w) for t, w in sorted(updates.items())]
    assert steps == reference_plan(data_dirs, 30, schedule=schedule)
    state = mixture.state_dict(0, True)
    assert len(state['planner']['schedule']) <= mixture.delay + 2, len(state['planner']['schedule'])


# ---- epochs and exhaustion -------------------------------------------------------------------


def test_epochs_have_steps_per_epoch_batches_and_continue_the_plan(data_dirs, mixture):
    dataset = mixture
    assert len(build(dataset)) == sum(SIZES) // BATCH
    loader = build(dataset, steps_per_epoch=5)
    assert len(loader) == 5
    first = [check_batch(b) for b in loader]
    second = [check_batch(b) for b in loader]
    assert len(first) == len(second) == 5
    assert first + second == reference_plan(data_dirs, 10)
    assert dataset.state_dict(0, True)['consumed'] == 10


def test_repeat_policy_starts_new_passes_of_a_small_domain(data_dirs, mixture):
    dataset = mixture
    loader = build(dataset, weights=[0.2, 0.2, 0.6], on_exhausted='repeat')
    steps = take(loader, dataset, len(loader))
    assert len(steps) == len(loader)
    seen = np.array([sum(counts_of(items)[k] for items in steps) for k in range(len(SIZES))])
    # domain_epochs counts what the trainer took, not what the loader planned ahead.
    np.testing.assert_allclose(dataset.domain_epochs(), seen / np.array(SIZES), rtol=0, atol=1e-12)
    assert dataset.domain_epochs()[2] > 1
    small = [i for items in steps for d, i in items if d == 2]
    passes = len(small) // SIZES[2]
    assert passes >= 2
    for p in range(passes):  # every full pass reads each sample once
        assert sorted(small[p * SIZES[2]:(p + 1) * SIZES[2]]) == list(range(SIZES[2]))


def test_drop_policy_removes_an_exhausted_domain_and_keeps_batches_full(data_dirs, mixture):
    dataset = mixture
    loader = build(dataset, weights=[0.2, 0.2, 0.6], on_exhausted='drop')
    steps = take(loader, dataset, len(loader))
    assert len(steps) == len(loader)
    assert all(len(items) == BATCH for items in steps)
    everything = [item for items in steps for item in items]
    assert len(set(everything)) == len(everything)  # nothing is read twice
    assert sorted(i for d, i in everything if d == 2) == list(range(SIZES[2]))
    last_with_small = max(t for t, items in enumerate(steps) if counts_of(items)[2])
    assert last_with_small < len(steps) - 1
    assert dataset.weights_at(len(steps) - 1)[2] == 0
    assert not dataset.finished


def test_stop_policy_ends_the_loader_before_a_second_pass(data_dirs, mixture):
    dataset = mixture
    loader = build(dataset, weights=[0.2, 0.2, 0.6], on_exhausted='stop')  # 5 of domain 2 (23) per batch
    steps = []
    for batch in loader:
        steps.append(check_batch(batch))
        if len(steps) == 1:
            assert not dataset.finished  # the planner may have ended, the trainer has not
    assert len(steps) == SIZES[2] // 5 < len(loader)
    assert dataset.finished
    assert [b for b in loader] == []  # a plain loop over an ended mixture ends ...
    with pytest.raises(RuntimeError, match='mixture has ended'):  # ... but a caller that keeps asking is told
        next(iter(loader))
    everything = [item for items in steps for item in items]
    assert len(set(everything)) == len(everything)


# ---- bad input -------------------------------------------------------------------------------


def test_bad_weights_raise_and_leave_the_state_unchanged(data_dirs, mixture):
    dataset = mixture
    loader = build(dataset, num_workers=0)
    first = take(loader, dataset, 2)
    before = json.dumps(dataset.state_dict(0, True))
    bad = {
        'nan': [float('nan'), 0.5, 0.5],
        'inf': [float('inf'), 0.5, 0.5],
        'negative': [-0.1, 0.6, 0.5],
        'wrong length': [0.5, 0.5],
        'zero sum': [0.0, 0.0, 0.0],
    }
    for name, weights in bad.items():
        with pytest.raises(ValueError):
            dataset.set_weights(weights, after_step=1)
        assert json.dumps(dataset.state_dict(0, True)) == before, name
    with pytest.raises(ValueError):  # a step that is already planned
        dataset.planner.schedule_weights(W1, dataset.planner.step - 1)
    assert json.dumps(dataset.state_dict(0, True)) == before
    assert first + take(loader, dataset, 2) == reference_plan(data_dirs, 4)


def test_a_missing_domain_directory_is_named(data_dirs, tmp_path):
    sources = [DomainSource('web', data_dirs[0]), DomainSource('wiki', str(tmp_path / 'no-such-dir'))]
    with pytest.raises((FileNotFoundError, ValueError), match='wiki'):
        MixtureDataset(sources)


def test_a_local_shard_that_does_not_match_its_hash_is_refused_with_the_domain_named(data_dirs, tmp_path):
    """Local shards are checked at build time against ``validate_hash``; ``None`` (the YAML's null) skips it."""
    corrupt = tmp_path / 'news'
    shutil.copytree(data_dirs[1], corrupt)
    shard = corrupt / shard_files(data_dirs[1])[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    sources = [DomainSource('web', data_dirs[0]), DomainSource('news', str(corrupt))]
    with pytest.raises(ValueError, match=f"'news': shard {shard} does not match its xxh64 hash"):
        MixtureDataset(sources, validate_hash='xxh64')
    with pytest.raises(ValueError, match=r"'web': shard .* records no sha1 hash \(it has \['xxh64'\]\)"):
        MixtureDataset(sources, validate_hash='sha1')
    assert MixtureDataset(sources, validate_hash=None).domain_names == ['web', 'news']


def test_domains_with_different_seq_len_are_refused(data_dirs, tmp_path):
    longer = write_domain(str(tmp_path / 'long'), 1, 12, seq_len=32)
    with pytest.raises(ValueError, match='seq_len') as error:
        MixtureDataset([DomainSource('short', data_dirs[0]), DomainSource('long', longer)])
    assert '16' in str(error.value) and '32' in str(error.value)


def test_duplicate_domain_names_are_refused(data_dirs):
    with pytest.raises(ValueError, match='web'):
        MixtureDataset([DomainSource('web', data_dirs[0]), DomainSource('web', data_dirs[1])])


def test_domains_sharing_a_local_directory_are_refused(data_dirs):
    with pytest.raises(ValueError, match=r"\['web', 'wiki'\] share the local directory"):
        MixtureDataset([DomainSource('web', data_dirs[0]), DomainSource('books', data_dirs[1]),
                        DomainSource('wiki', data_dirs[0] + '/')])


def test_an_empty_domain_is_named(data_dirs, tmp_path):
    empty = write_domain(str(tmp_path / 'empty'), 1, 0, seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="domain 'void' has no samples"):
        MixtureDataset([DomainSource('web', data_dirs[0]), DomainSource('void', empty)])


@pytest.mark.parametrize('encoding', ['ndarray:int32', 'ndarray:uint32', 'ndarray:int64', 'bytes'])
def test_token_columns_of_llm_foundry_converters_are_read_and_cut_to_max_seq_len(tmp_path, encoding):
    """llm-foundry writes shapeless ``ndarray:int32`` (older datasets: raw int64 bytes); any integer
    dtype is read, and ``max_seq_len`` keeps the first ids of each sample."""
    from composer_pike.data import TokenReader
    dirs = [write_domain(str(tmp_path / f'd{k}'), k, 12, seq_len=SEQ_LEN + 4, token_encoding=encoding)
            for k in range(2)]
    dataset = MixtureDataset([DomainSource(f'd{k}', d) for k, d in enumerate(dirs)],
                             tokens=TokenReader(max_seq_len=SEQ_LEN))
    assert dataset.seq_len == SEQ_LEN
    for domain, index in ((0, 0), (1, 11)):
        _, _, tokens = dataset[(domain, index)]
        assert tokens.tolist() == sample_tokens(domain, index, SEQ_LEN + 4)[:SEQ_LEN].tolist()


def test_samples_shorter_than_max_seq_len_are_refused_with_the_conversion_that_fixes_them(tmp_path):
    from composer_pike.data import TokenReader
    short = write_domain(str(tmp_path / 'short'), 0, 12, seq_len=8, token_encoding='ndarray:int32')
    with pytest.raises(ValueError, match=r"domain 'short': sample 0 has 8 tokens, fewer than max_seq_len 16.*"
                                         r'--concat_tokens 16'):
        MixtureDataset([DomainSource('short', short)], tokens=TokenReader(max_seq_len=SEQ_LEN))


def test_a_domain_of_text_shards_is_refused_with_how_to_convert(data_dirs, tmp_path):
    from streaming import MDSWriter
    with MDSWriter(out=str(tmp_path / 'text'), columns={'text': 'str'}) as writer:
        writer.write({'text': 'not tokenized'})
    with pytest.raises(ValueError, match=r"domain 'raw': the shards hold a 'text' column and no 'tokens'.*"
                                         r'convert_dataset_json --concat_tokens'):
        MixtureDataset([DomainSource('web', data_dirs[0]), DomainSource('raw', str(tmp_path / 'text'))])


FD_SCRIPT = r"""
import os, resource, shutil, sys
sys.path.insert(0, sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # a common default
from mds_helpers import sample_tokens, write_domain
from composer_pike.data import DomainSource, MixtureDataset
template = write_domain(os.path.join(sys.argv[2], 'template'), 0, 12)
dirs = [shutil.copytree(template, os.path.join(sys.argv[2], f'd{k}')) for k in range(int(sys.argv[3]))]
dataset = MixtureDataset([DomainSource(f'd{k}', d) for k, d in enumerate(dirs)])
assert all((dataset[(k, 11)][2] == sample_tokens(0, 11, 16)).all() for k in range(len(dirs)))
print('domains', dataset.num_domains, 'open fds', len(os.listdir('/proc/self/fd')))
"""


def test_a_mixture_of_many_domains_fits_in_a_default_file_descriptor_limit(tmp_path):
    """2 and 64 small domains under RLIMIT_NOFILE=1024, each in a fresh process (private /dev/shm where
    possible): the open file descriptors do not grow with the number of domains."""
    fds = {}
    for k in (2, 64):
        (tmp_path / f'tmp{k}').mkdir()
        command = [sys.executable, '-c', FD_SCRIPT, str(Path(__file__).parent), str(tmp_path / f'data{k}'), str(k)]
        result = subprocess.run(with_private_shm(command), cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=LAUNCH_TIMEOUT, env=dict(os.environ, TMPDIR=str(tmp_path / f'tmp{k}')))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        words = result.stdout.split()
        assert words[:2] == ['domains', str(k)], result.stdout
        fds[k] = int(words[-1])
    assert fds[64] <= fds[2] + 2, fds


CONCURRENT_SCRIPT = r"""
import os, sys, traceback
sys.path.insert(0, sys.argv[1])
from mds_helpers import sample_tokens
from composer_pike.data import DomainSource, MixtureDataset
builds, dirs = int(sys.argv[2]), sys.argv[3:]
child = os.fork()  # two processes from here on, both before their first dataset
mine = dirs[:len(dirs) // 2] if child else dirs[len(dirs) // 2:]
try:
    for _ in range(builds):
        dataset = MixtureDataset([DomainSource(f'd{k}', d) for k, d in enumerate(mine)])
        assert (dataset[(1, 3)][2] == sample_tokens(1, 3, dataset.seq_len)).all()
    code = 0
except BaseException:
    traceback.print_exc()
    code = 1
if not child:
    sys.exit(code)
child_code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
print('exit codes', code, child_code)
sys.exit(code or child_code)
"""


def test_two_processes_building_mixtures_at_the_same_time_do_not_collide(tmp_path):
    """Streaming registers shared memory under the first free name prefix without a lock, and its
    stale-memory cleanup creates and unlinks names of live datasets: two processes starting together
    failed with FileExistsError / FileNotFoundError on /dev/shm/<prefix>_locals. Both processes
    share one /dev/shm (private to this test where possible) and one TMPDIR, each with its own data."""
    dirs = [*write_domains(str(tmp_path / 'a'), [20, 10], seq_len=SEQ_LEN),
            *write_domains(str(tmp_path / 'b'), [20, 10], seq_len=SEQ_LEN)]
    (tmp_path / 'tmp').mkdir()
    command = [sys.executable, '-c', CONCURRENT_SCRIPT, str(Path(__file__).parent), '8', *dirs]
    result = subprocess.run(with_private_shm(command), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT, env=dict(os.environ, TMPDIR=str(tmp_path / 'tmp')))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert 'exit codes 0 0' in result.stdout


STALE_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from mds_helpers import sample_tokens
from composer_pike.data import DomainSource, MixtureDataset
first, second = sys.argv[2:4], sys.argv[4:6]
with open('/dev/shm/000007_locals', 'wb') as f:  # left by a crashed run: mapped by no process
    f.write(b'stale')
ready_r, ready_w = os.pipe()
done_r, done_w = os.pipe()
child = os.fork()
if child == 0:  # a job that is running: it holds its dataset while the other one starts
    os.close(ready_r); os.close(done_w)
    dataset = MixtureDataset([DomainSource(f'd{k}', d) for k, d in enumerate(first)])
    os.write(ready_w, str(dataset.streaming._shm_prefix_int).encode()); os.close(ready_w)
    os.read(done_r, 1)
    assert (dataset[(1, 3)][2] == sample_tokens(1, 3, dataset.seq_len)).all()
    os._exit(0)
running = int(os.read(ready_r, 16))
names = sorted(n for n in os.listdir('/dev/shm') if n.startswith(f'{running:06}_'))
dataset = MixtureDataset([DomainSource(f'd{k}', d) for k, d in enumerate(second)])
print('running', running, 'new', dataset.streaming._shm_prefix_int)
print('kept', all(os.path.exists('/dev/shm/' + n) for n in names) and bool(names))
print('stale_removed', not os.path.exists('/dev/shm/000007_locals'))
os.write(done_w, b'x')
print('child', os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
"""


def test_a_new_job_cleans_only_the_shared_memory_no_process_maps(tmp_path):
    """Stale segments (mapped by no process) are removed; a running job's are not, and the new job takes
    another prefix. (streaming's own cleaner unlinked the running job's names, and both used prefix 0.)"""
    dirs = [*write_domains(str(tmp_path / 'a'), [20, 10], seq_len=SEQ_LEN),
            *write_domains(str(tmp_path / 'b'), [20, 10], seq_len=SEQ_LEN)]
    (tmp_path / 'tmp').mkdir()
    command = [sys.executable, '-c', STALE_SCRIPT, str(Path(__file__).parent), *dirs]
    result = subprocess.run(with_private_shm(command, required=True), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT, env=dict(os.environ, TMPDIR=str(tmp_path / 'tmp')))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = dict(line.split(' ', 1) for line in result.stdout.strip().splitlines())
    running, new = lines['running'].split(' new ')
    assert running != new, result.stdout
    assert lines['kept'] == 'True' and lines['stale_removed'] == 'True' and lines['child'] == '0', result.stdout


def test_shared_memory_names_taken_by_another_process_are_retried(data_dirs, monkeypatch):
    """FileExistsError on streaming's prefix registration (a process outside composer-pike's lock took
    the same name at the same moment) is retried by a single process."""
    import streaming.base.dataset
    register = streaming.base.dataset.get_shm_prefix
    calls = []

    def taken_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise FileExistsError(17, 'File exists', '/000000_locals')
        return register(*args, **kwargs)

    monkeypatch.setattr(streaming.base.dataset, 'get_shm_prefix', taken_twice)
    dataset = open_mixture(data_dirs)
    assert len(calls) == 3
    assert dataset.domain_sizes.tolist() == SIZES
    assert np.array_equal(dataset[(2, 5)][2], sample_tokens(2, 5, SEQ_LEN))


# ---- pike-prep manifests -----------------------------------------------------------------------


def write_prep_tree(root: Path, sizes=((30, 6), (20, 4))) -> dict:
    """A pike-prep style tree root/d{k}/{train,val} with a hand-written manifest.json."""
    domains = {}
    for k, (train, val) in enumerate(sizes):
        write_domain(str(root / f'd{k}' / 'train'), k, train, seq_len=SEQ_LEN)
        write_domain(str(root / f'd{k}' / 'val'), k, val, seq_len=SEQ_LEN)
        domains[f'd{k}'] = {'splits': {
            'train': {'path': f'd{k}/train', 'samples': train, 'tokens': train * SEQ_LEN},
            'val': {'path': f'd{k}/val', 'samples': val, 'tokens': val * SEQ_LEN},
        }}
    manifest = {'format': 'composer-pike-manifest/1', 'seq_len': SEQ_LEN, 'dtype': 'uint16', 'domains': domains}
    (root / 'manifest.json').write_text(json.dumps(manifest))
    return manifest


def test_sources_from_a_local_manifest(tmp_path):
    root = tmp_path / 'prep'
    write_prep_tree(root)
    for where in (str(root), str(root / 'manifest.json')):
        sources = sources_from_manifest(where)
        assert [s.name for s in sources] == ['d0', 'd1']
        assert [Path(s.local).resolve() for s in sources] == [root / 'd0' / 'train', root / 'd1' / 'train']
        assert all(s.remote is None for s in sources)
    val = sources_from_manifest(str(root), split='val')
    assert [Path(s.local).resolve() for s in val] == [root / 'd0' / 'val', root / 'd1' / 'val']
    with pytest.raises(ValueError, match='d0'):
        sources_from_manifest(str(root), split='test')
    with pytest.raises(FileNotFoundError):
        sources_from_manifest(str(tmp_path / 'nowhere'))

    dataset = MixtureDataset(sources_from_manifest(str(root)))
    assert dataset.domain_names == ['d0', 'd1'] and dataset.domain_sizes.tolist() == [30, 20]
    loader = build_mixture_dataloader(dataset, BATCH, num_workers=0, rank=0, world_size=1)
    steps = take(loader, dataset, 3)
    assert len(steps) == 3 and all(counts_of(items)[:2] == [4, 4] for items in steps)


def test_sources_from_a_manifest_named_relative_to_the_working_directory(tmp_path, monkeypatch):
    root = tmp_path / 'prep'
    write_prep_tree(root)
    for cwd, where in ((root, 'manifest.json'), (root, '.'), (tmp_path, 'prep'), (tmp_path, 'prep/manifest.json')):
        monkeypatch.chdir(cwd)
        sources = sources_from_manifest(where)
        assert all(Path(s.local).is_absolute() for s in sources), (cwd, where)
        assert [Path(s.local).resolve() for s in sources] == [root.resolve() / d / 'train' for d in ('d0', 'd1')]


# ---- probe batches -----------------------------------------------------------------------------


def test_probe_batch_does_not_depend_on_the_loader_look_ahead_and_changes_no_plan(data_dirs, mixture,
                                                                                   other_mixture):
    """Rank slices, pass boundaries and resumption of the probe order: tests/test_probe_order.py."""
    ahead = mixture  # its loader runs ahead of the trainer
    ahead_loader = build(ahead, num_workers=2)
    take(ahead_loader, ahead, 3)
    assert ahead.planner.step > 3
    exact = other_mixture  # no look-ahead
    exact_loader = build(exact, num_workers=0)
    take(exact_loader, exact, 3)
    assert exact.planner.step == 3

    for domain in range(len(SIZES)):
        for _ in range(2):  # each call continues the domain's probe order
            probe, same = ahead.probe_batch(domain, 4), exact.probe_batch(domain, 4)
            assert check_batch(probe) and probe['domain'].tolist() == [domain] * 4
            for key in probe:
                assert torch.equal(probe[key], same[key]), key
    with pytest.raises(ValueError):
        ahead.probe_batch(0, 3, rank=0, world_size=2)

    reference = reference_plan(data_dirs, 5)
    assert take(exact_loader, exact, 2) == reference[3:5]
    assert take(ahead_loader, ahead, 2) == reference[3:5]


# ---- S3 through moto's server mode -------------------------------------------------------------


def upload_tree(client, local: Path | str, bucket: str, prefix: str) -> None:
    for path in sorted(Path(local).rglob('*')):
        if path.is_file():
            client.upload_file(str(path), bucket, f'{prefix}/{path.relative_to(local).as_posix()}')


@pytest.fixture(scope='module')
def s3_remotes(s3_server, data_dirs) -> list[str]:
    """The test domains uploaded to s3://pike-data-tests/mix/d{k}."""
    bucket = 'pike-data-tests'
    s3_server.create_bucket(bucket)
    client = s3_server.client()
    for k, directory in enumerate(data_dirs):
        upload_tree(client, directory, bucket, f'mix/d{k}')
    return [f's3://{bucket}/mix/d{k}' for k in range(len(data_dirs))]


def remote_mixture(remotes, cache: Path, **kwargs) -> MixtureDataset:
    return MixtureDataset([DomainSource(f'd{k}', str(cache / f'd{k}'), remote=r) for k, r in enumerate(remotes)],
                          validate_hash='xxh64', **kwargs)


def test_s3_domains_yield_the_same_samples_as_local_ones(mixture, s3_remotes, tmp_path):
    changes = {3: W1}
    local_tokens, remote_tokens = [], []
    local = mixture
    local_steps = take(build(local), local, 12, changes, local_tokens)
    remote = remote_mixture(s3_remotes, tmp_path / 'cache')
    assert remote.domain_sizes.tolist() == SIZES and remote.seq_len == SEQ_LEN
    remote_steps = take(build(remote), remote, 12, changes, remote_tokens)
    assert remote_steps == local_steps
    assert all(torch.equal(a, b) for a, b in zip(remote_tokens, local_tokens))
    assert any(name.startswith('shard.') for name in os.listdir(tmp_path / 'cache' / 'd0'))


def test_s3_shards_of_upcoming_steps_are_prefetched_before_they_are_read(data_dirs, s3_remotes, tmp_path):
    cache = tmp_path / 'cache'
    dataset = remote_mixture(s3_remotes, cache)
    horizon = 6
    loader = build(dataset, num_workers=0, shuffle=False, prefetch_steps=horizon)
    batches = iter(loader)
    first = check_batch(next(batches))
    assert dataset.planner.step == 1  # nothing beyond the first batch was planned or read
    plan = reference_plan(data_dirs, 1 + horizon, shuffle=False)
    assert first == plan[0]
    needed_now = {k: shards_of(data_dirs[k], [i for d, i in plan[0] if d == k]) for k in range(len(SIZES))}
    upcoming = {k: shards_of(data_dirs[k], [i for items in plan[1:] for d, i in items if d == k])
                for k in range(len(SIZES))}
    names = {k: shard_files(data_dirs[k]) for k in range(len(SIZES))}

    def local_shards(k: int) -> set[int]:
        present = set(os.listdir(cache / f'd{k}'))
        return {s for s, name in enumerate(names[k]) if name in present}

    dataset.sampler.prefetcher.wait()
    for k in range(len(SIZES)):
        assert upcoming[k] <= local_shards(k), f'domain {k}: upcoming shards {upcoming[k]} not prefetched'
    assert sum(len(local_shards(k)) for k in upcoming) > sum(len(needed_now[k]) for k in needed_now)
    assert len(names[0]) - 1 not in local_shards(0)  # far beyond the horizon: not fetched
    rest = [check_batch(next(batches)) for _ in range(horizon)]
    assert rest == plan[1:]
    batches.close()


def test_s3_prefetches_still_queued_when_the_loader_stops_reading_are_dropped(s3_remotes, tmp_path):
    """A run that ends (its iterator is dropped) leaves no queued shard downloads to run at
    interpreter exit; a later pass over the loader asks for the same shards again."""
    cache = tmp_path / 'cache'
    dataset = remote_mixture(s3_remotes, cache)
    build(dataset, num_workers=0, shuffle=False, prefetch_steps=6)
    prefetcher = dataset.sampler.prefetcher
    release = threading.Event()
    # Every download thread waits on `release`, so the prefetches planned below stay queued.
    blockers = [prefetcher.pool.submit(release.wait) for _ in range(prefetcher.pool._max_workers)]
    try:
        plans = iter(dataset.sampler)
        next(plans)
        queued = set(prefetcher.requested)
        assert queued, 'planning a step requested no shard'
        plans.close()  # what a Trainer leaving its loop does to the loader's iterator
        assert prefetcher.requested == set(), 'queued downloads survived the end of the pass'
    finally:
        release.set()
    for blocker in blockers:
        blocker.result()
    prefetcher.wait()
    assert not [name for k in range(len(SIZES)) for name in os.listdir(cache / f'd{k}') if name.startswith('shard.')]

    plans = iter(dataset.sampler)  # the same step, planned again: the same shards, downloaded this time
    next(plans)
    assert prefetcher.requested == queued
    prefetcher.wait()
    assert any(name.startswith('shard.') for name in os.listdir(cache / 'd0'))
    plans.close()


def test_s3_manifest_streams_every_domain_into_the_cache_root(s3_server, tmp_path):
    root = tmp_path / 'prep'
    write_prep_tree(root)
    bucket = 'pike-prep-tests'
    s3_server.create_bucket(bucket)
    upload_tree(s3_server.client(), root, bucket, 'run1')
    manifest = f's3://{bucket}/run1/manifest.json'
    with pytest.raises(ValueError, match='cache_root'):
        sources_from_manifest(manifest)
    cache = tmp_path / 'cache'
    sources = sources_from_manifest(manifest, cache_root=str(cache))
    assert [(s.name, s.remote) for s in sources] == [('d0', f's3://{bucket}/run1/d0/train'),
                                                    ('d1', f's3://{bucket}/run1/d1/train')]
    assert [Path(s.local) for s in sources] == [cache / 'd0' / 'train', cache / 'd1' / 'train']
    dataset = MixtureDataset(sources, validate_hash='xxh64')
    assert dataset.domain_sizes.tolist() == [30, 20]
    loader = build_mixture_dataloader(dataset, BATCH, num_workers=0, rank=0, world_size=1)
    assert len(take(loader, dataset, 2)) == 2


def corrupted_remote(s3_server, root: Path, bucket: str) -> tuple[list[DomainSource], str]:
    """Domains 'books' (30 samples) and 'forums' (20) on S3; forums' first shard fails its xxh64 check.

    Returns the sources (cached under root/cache) and the corrupted shard's basename.
    """
    dirs = write_domains(str(root / 'data'), [30, 20], seq_len=SEQ_LEN)
    name = shard_files(dirs[1])[0]
    shard = Path(dirs[1]) / name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a token of a sample in the middle of the first shard
    shard.write_bytes(bytes(data))
    s3_server.create_bucket(bucket)
    for k, directory in enumerate(dirs):
        upload_tree(s3_server.client(), directory, bucket, f'mix/d{k}')
    return [DomainSource(name, str(root / 'cache' / name), remote=f's3://{bucket}/mix/d{k}')
            for k, name in enumerate(['books', 'forums'])], name


@pytest.mark.parametrize('num_workers', [0, 2])
def test_s3_a_corrupted_shard_fails_loudly_with_the_domain_named(s3_server, tmp_path, num_workers):
    """A remote shard that fails xxh64 validation must raise (naming domain, shard and remote), never
    hang and never be read, whichever of the prefetcher and the readers downloads it first."""
    sources, corrupted = corrupted_remote(s3_server, tmp_path, f'pike-corrupt-{num_workers}')
    dataset = MixtureDataset(sources, validate_hash='xxh64')
    loader = build_mixture_dataloader(dataset, BATCH, weights=[0.5, 0.5], shuffle=False, num_workers=num_workers,
                                      rank=0, world_size=1)
    # Four steps read forums samples 0..15, the corrupted one among them. A daemon thread reads, so
    # that a hang fails this test instead of stalling the suite.
    outcome = {}

    def read() -> None:
        try:
            outcome['steps'] = take(loader, dataset, 4)
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome['error'] = error

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=90)  # reading 4 small batches takes seconds; this only detects a hang
    if reader.is_alive():
        pytest.fail('the loader hung on a shard that failed its hash check')
    error = outcome.get('error')
    if error is None:
        pytest.fail('a shard that fails its xxh64 check was read without an error')
    if isinstance(error, AssertionError):
        pytest.fail(f'corrupted samples were yielded: {error}')
    for part in ("domain 'forums'", corrupted, sources[1].remote):
        assert part in str(error), f'the error does not name {part}: {error!r}'
    assert not (tmp_path / 'cache' / 'forums' / corrupted).exists()  # never placed where readers look


def test_s3_a_shard_failing_in_the_prefetcher_is_left_to_its_readers(s3_server, tmp_path):
    """Planning alone (no sample is read) prefetches the corrupted shard: the failure is recorded and
    planning goes on; the shard goes back to the readers, one of which fails naming it."""
    sources, corrupted = corrupted_remote(s3_server, tmp_path, 'pike-corrupt-prefetch')
    dataset = MixtureDataset(sources, validate_hash='xxh64')
    build_mixture_dataloader(dataset, BATCH, weights=[0.5, 0.5], shuffle=False, num_workers=0, rank=0, world_size=1)
    plans = iter(dataset.sampler)
    assert [d for d, _ in next(plans)] == [0] * 4 + [1] * 4
    prefetcher = dataset.sampler.prefetcher
    prefetcher.wait()
    assert len(prefetcher.failed) == 1, prefetcher.failed
    (failure,) = prefetcher.failed.values()
    assert "domain 'forums'" in failure and corrupted in failure and 'xxh64' in failure
    assert [d for d, _ in next(plans)] == [0] * 4 + [1] * 4  # planning does not read samples
    with pytest.raises(RuntimeError, match="domain 'forums'") as error:
        dataset[(1, 0)]
    assert corrupted in str(error.value) and 'xxh64' in str(error.value)
    with pytest.raises(RuntimeError) as again:  # and stays failed, with the same message
        dataset[(1, 1)]
    assert str(again.value) == str(error.value)


def test_s3_missing_domain_is_named(s3_remotes, tmp_path):
    missing = s3_remotes[0].rsplit('/', 1)[0] + '/nope'
    sources = [DomainSource('web', str(tmp_path / 'web'), remote=s3_remotes[0]),
               DomainSource('books', str(tmp_path / 'books'), remote=missing)]
    with pytest.raises(Exception, match="domain 'books'") as error:
        MixtureDataset(sources, download_retry=1, download_timeout=10)
    assert missing in str(error.value)


def test_s3_manifest_is_downloaded_again_when_read_again(s3_server, tmp_path):
    """A remote manifest rewritten at the remote (a re-run of pike-prep) is not served from the cache."""
    root = tmp_path / 'prep'
    first = write_prep_tree(root)
    bucket = 'pike-manifest-refresh'
    s3_server.create_bucket(bucket)
    upload_tree(s3_server.client(), root, bucket, 'run')
    manifest, cache = f's3://{bucket}/run/manifest.json', tmp_path / 'cache'
    assert read_manifest(manifest, str(cache)) == first
    assert [s.name for s in sources_from_manifest(manifest, cache_root=str(cache))] == ['d0', 'd1']
    second = dict(first, domains={'d1': first['domains']['d1']})
    s3_server.client().put_object(Bucket=bucket, Key='run/manifest.json', Body=json.dumps(second).encode())
    assert read_manifest(manifest, str(cache)) == second
    assert [s.name for s in sources_from_manifest(manifest, cache_root=str(cache))] == ['d1']
    assert json.loads((cache / 'manifest.json').read_text()) == second
    assert sorted(p.name for p in cache.iterdir()) == ['manifest.json']  # no temporary files left


@pytest.mark.parametrize('retry', [1, 2])
def test_s3_manifest_download_is_retried_download_retry_times(s3_server, tmp_path, monkeypatch, retry):
    """Two failed downloads in a row: ``retry=2`` gets through on the third attempt, ``retry=1`` gives up
    with the download's own error; neither leaves a temporary file in the cache."""
    from streaming.base.storage.download import CloudDownloader

    root = tmp_path / 'prep'
    expected = write_prep_tree(root)
    bucket = f'pike-manifest-retry{retry}'
    s3_server.create_bucket(bucket)
    upload_tree(s3_server.client(), root, bucket, 'run')
    real_download, attempts = CloudDownloader.direct_download, []

    def failing_twice(url, path, timeout):
        attempts.append(url)
        if len(attempts) <= 2:
            open(path, 'w').close()  # a partial file the reader must not keep
            raise ConnectionError(f'injected failure {len(attempts)} for {url}')
        real_download(url, path, timeout=timeout)

    monkeypatch.setattr(CloudDownloader, 'direct_download', staticmethod(failing_twice))
    manifest, cache = f's3://{bucket}/run', tmp_path / 'cache'
    if retry == 2:
        assert read_manifest(manifest, str(cache), retry=retry) == expected
        assert sorted(p.name for p in cache.iterdir()) == ['manifest.json']
    else:
        with pytest.raises(ConnectionError, match='injected failure 2'):
            read_manifest(manifest, str(cache), retry=retry)
        assert list(cache.iterdir()) == []
    assert attempts == [f's3://{bucket}/run/manifest.json'] * min(3, retry + 1)


# ---- multi-process: Composer's launcher, gloo ----------------------------------------------------


MP_STEPS = 22  # crosses the epoch boundary at 19
MP_CHANGE = 3


def private_shm_available() -> bool:
    if not hasattr(private_shm_available, 'result'):
        ok = shutil.which('unshare') is not None and subprocess.run(
            ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', 'mount -t tmpfs pike-test-shm /dev/shm'],
            capture_output=True, timeout=60).returncode == 0
        private_shm_available.result = ok
    return private_shm_available.result


def with_private_shm(command: list[str], required: bool = False) -> list[str]:
    """Run ``command`` with its own empty /dev/shm, as on a separate host (needs ``unshare --mount``).

    Streaming's shared-memory names are host-wide, and its stale-memory cleanup (called by every
    MixtureDataset) unlinks segments that other processes on the host still use, so processes of
    other test runs on a shared machine can disturb each other. Without unshare the command runs as is.
    """
    if private_shm_available():
        return ['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                'mount -t tmpfs pike-test-shm /dev/shm && exec "$@"', 'sh', *command]
    if required:
        pytest.skip('needs `unshare --mount` (root) to give each simulated node a private /dev/shm')
    return command






class Launches:
    """Launcher processes started together; ``results(name)`` waits for one group."""

    def __init__(self) -> None:
        self.groups: dict[str, tuple[list[subprocess.Popen], Path]] = {}
        self.started = time.monotonic()

    def start(self, name: str, commands: list[tuple[list[str], dict]], out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        procs = []
        for i, (command, env) in enumerate(commands):
            log = open(out / f'launcher{i}.log', 'w')
            procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            log.close()
        self.groups[name] = (procs, out)

    def results(self, name: str) -> list[dict]:
        procs, out = self.groups[name]
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, LAUNCH_TIMEOUT - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:
                self.kill(proc)
        codes = [proc.returncode for proc in procs]
        found = sorted(out.glob('rank*.json'))
        if any(codes) or len(found) != 2:
            logs = '\n'.join(f'--- {p.name}\n{p.read_text()[-6000:]}' for p in sorted(out.glob('*.log'))
                             if p.is_file())
            logs += '\n'.join(f'--- {p.name}\n{p.read_text()[-6000:]}' for p in sorted(out.glob('rank*.std*')))
            pytest.fail(f'{name}: launcher exit codes {codes}, results {[p.name for p in found]}\n{logs}')
        return [json.loads((out / f'rank{r}.json').read_text()) for r in range(2)]

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started (own session)
            proc.wait()

    def close(self) -> None:
        for procs, _ in self.groups.values():
            for proc in procs:
                self.kill(proc)


@pytest.fixture(scope='module')
def launched(data_dirs, tmp_path_factory):
    """One node with two ranks, and (where possible) two simulated one-rank nodes, run concurrently."""
    root = tmp_path_factory.mktemp('launch')
    worker_args = ['--batch', str(BATCH), '--steps', str(MP_STEPS), '--seed', str(SEED), '--num-workers', '2',
                   '--weights', ','.join(map(str, W0)), '--change-after', str(MP_CHANGE),
                   '--new-weights', ','.join(map(str, W1))]
    launcher = [sys.executable, '-m', 'composer.cli.launcher']
    launches = Launches()
    one = root / 'one_node'
    (one / 'tmp').mkdir(parents=True)
    launches.start('one_node', [(
        with_private_shm([*launcher, '-n', '2', '--master_port', str(free_port()),
                          '--stdout', str(one / 'rank{rank}.stdout'), '--stderr', str(one / 'rank{rank}.stderr'),
                          'tests/data_worker.py', '--out', str(one), *worker_args, *data_dirs]),
        dict(os.environ, TMPDIR=str(one / 'tmp')))], one)
    if private_shm_available():  # two "hosts": each its own /dev/shm, TMPDIR and streaming cache
        port = free_port()
        commands = []
        for node in (0, 1):
            node_root = root / f'node{node}'
            (node_root / 'tmp').mkdir(parents=True)
            commands.append((
                with_private_shm([*launcher, '--world_size', '2', '--nproc', '1', '--node_rank', str(node),
                                  '--master_addr', '127.0.0.1', '--master_port', str(port),
                                  'tests/data_worker.py', '--out', str(root / 'two_nodes'),
                                  '--cache-root', str(node_root / 'cache'), *worker_args, *data_dirs]),
                dict(os.environ, TMPDIR=str(node_root / 'tmp'))))
        launches.start('two_nodes', commands, root / 'two_nodes')
    try:
        yield launches, root
    finally:
        launches.close()


def rank_items(result: dict, step: int) -> list[tuple[int, int]]:
    return list(zip(result['steps'][step]['domain'], result['steps'][step]['sample_id']))


def test_two_ranks_on_one_node_split_one_global_plan(launched, data_dirs):
    launches, _ = launched
    ranks = launches.results('one_node')
    assert [r['rank'] for r in ranks] == [0, 1] and all(r['world_size'] == 2 for r in ranks)
    assert all(r['tokens_ok'] for r in ranks)
    delay = ranks[0]['delay']
    assert delay == 4 and all(r['effective_step'] == MP_CHANGE + 1 + delay for r in ranks)
    reference = reference_plan(data_dirs, MP_STEPS, schedule=[(MP_CHANGE + 1 + delay, W1)])
    assert all(len(r['steps']) == MP_STEPS for r in ranks)
    for step in range(MP_STEPS):
        mine, theirs = rank_items(ranks[0], step), rank_items(ranks[1], step)
        assert len(mine) == len(theirs) == BATCH // 2
        assert not set(mine) & set(theirs), f'step {step}: ranks share samples'
        assert sorted(mine + theirs) == sorted(reference[step]), f'step {step}'
        assert mine + theirs == reference[step], f'step {step}: not contiguous domain-sorted slices'
        for items in (mine, theirs):
            assert [d for d, _ in items] == sorted(d for d, _ in items)
    assert ranks[0]['state'] == ranks[1]['state']  # the checkpointed state is the same on every rank
    assert ranks[0]['state']['consumed'] == MP_STEPS


def test_two_simulated_nodes_yield_the_plan_of_one_node_with_two_ranks(launched, data_dirs):
    launches, root = launched
    if 'two_nodes' not in launches.groups:
        with_private_shm([], required=True)  # skips: without a private /dev/shm per node, streaming collides
    nodes = launches.results('two_nodes')
    one_node = launches.results('one_node')
    assert [(r['rank'], r['node_rank'], r['local_world_size']) for r in nodes] == [(0, 0, 1), (1, 1, 1)]
    assert all(r['tokens_ok'] for r in nodes)
    for rank in range(2):
        assert nodes[rank]['steps'] == one_node[rank]['steps'], f'rank {rank}'
        assert nodes[rank]['state'] == one_node[rank]['state']
    for node in range(2):  # each node read through its own cache, copied from the "remote" data dirs
        cached = list((root / f'node{node}' / 'cache' / 'd0').glob('shard.*'))
        assert cached, f'node {node} cached no shards'
