"""The PiKE probe's own per-domain order (composer_pike.data.probe_order) and MixtureDataset.probe_batch over it.

The bijection and the cursors are checked on their own; the dataset tests run on small real MDS
domains (tests/mds_helpers.py), whose tokens tell which (domain, sample) a row holds.
"""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from composer_pike.data import DomainSource, MixtureDataset, build_mixture_dataloader
from composer_pike.data.probe_order import ProbeOrder, pass_keys, permute
from mds_helpers import sample_tokens, write_domains

SIZES = [45, 12, 7]  # shards of 10 samples; 64 // 8 = 8 steps per loader epoch
SEQ_LEN = 16
BATCH = 8
SEED = 23


# ---- the keyed bijection -----------------------------------------------------------------------


@pytest.mark.parametrize('size', [1, 2, 3, 7, 1000, 2**16 + 3])
def test_every_pass_is_a_permutation_of_the_domain(size):
    for seed, domain, pass_index in ((0, 0, 0), (5, 3, 1), (2**40, 17, 9)):
        images = permute(np.arange(size), size, pass_keys(seed, domain, pass_index))
        assert images.dtype == np.int64
        np.testing.assert_array_equal(np.sort(images), np.arange(size))


def test_permutations_differ_between_passes_seeds_and_domains():
    size = 1000
    base = permute(np.arange(size), size, pass_keys(0, 0, 0))
    assert not np.array_equal(base, np.arange(size))
    for other in ((0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 2)):
        images = permute(np.arange(size), size, pass_keys(*other))
        assert np.mean(images == base) < 0.05, other  # a permutation of its own, not a shifted copy


def test_a_slice_of_positions_maps_like_the_whole_pass():
    keys = pass_keys(3, 1, 4)
    whole = permute(np.arange(2**16 + 3), 2**16 + 3, keys)
    np.testing.assert_array_equal(permute(np.arange(500, 900), 2**16 + 3, keys), whole[500:900])


def test_memory_does_not_grow_with_the_domain_size():
    order = ProbeOrder([10**8, 5], seed=1)
    tracemalloc.start()
    try:
        ids = order.take(0, 256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak  # a few arrays of 256 entries, not the 800 MB of a permutation
    assert len(set(ids.tolist())) == 256 and ids.min() >= 0 and ids.max() < 10**8


# ---- cursors -----------------------------------------------------------------------------------


def test_take_never_repeats_within_a_pass_and_continues_into_the_next_pass():
    order = ProbeOrder([10, 7], seed=SEED)
    taken = np.concatenate([order.take(1, 3) for _ in range(3)])  # 9 samples of a 7-sample domain
    pass0 = permute(np.arange(7), 7, pass_keys(SEED, 1, 0))
    pass1 = permute(np.arange(7), 7, pass_keys(SEED, 1, 1))
    np.testing.assert_array_equal(taken, np.concatenate([pass0, pass1[:2]]))
    np.testing.assert_array_equal(np.sort(taken[:7]), np.arange(7))
    assert order.state_dict() == {'passes': [0, 1], 'cursors': [0, 2]}
    # A take longer than a pass: the rest of pass 1, all of pass 2, the start of pass 3.
    longer = order.take(1, 13)
    pass2 = permute(np.arange(7), 7, pass_keys(SEED, 1, 2))
    pass3 = permute(np.arange(7), 7, pass_keys(SEED, 1, 3))
    np.testing.assert_array_equal(longer, np.concatenate([pass1[2:], pass2, pass3[:1]]))
    assert order.state_dict() == {'passes': [0, 3], 'cursors': [0, 1]}
    assert order.take(1, 0).tolist() == [] and order.state_dict()['cursors'] == [0, 1]


def test_domains_keep_separate_cursors():
    alone, mixed = ProbeOrder([50, 50], seed=SEED), ProbeOrder([50, 50], seed=SEED)
    expected = alone.take(0, 30)
    got = []
    for _ in range(3):
        got.append(mixed.take(0, 10))
        mixed.take(1, 20)
    np.testing.assert_array_equal(np.concatenate(got), expected)
    assert not np.array_equal(ProbeOrder([50, 50], SEED).take(1, 30), expected)  # equal sizes, own orders


def test_state_dict_round_trip_resumes_mid_pass():
    uninterrupted = ProbeOrder([20, 9], seed=SEED)
    uninterrupted.take(0, 13)
    uninterrupted.take(1, 11)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # primitives only
    assert state == {'passes': [0, 1], 'cursors': [13, 2]}
    resumed = ProbeOrder([20, 9], seed=SEED)
    resumed.load_state_dict(state)
    for domain, count in ((0, 5), (1, 8), (0, 9), (1, 3)):  # across both pass boundaries
        np.testing.assert_array_equal(resumed.take(domain, count), uninterrupted.take(domain, count))


@pytest.mark.parametrize('state', [
    {'passes': [0], 'cursors': [0]},
    {'passes': [0, 0], 'cursors': [0, 9]},
    {'passes': [-1, 0], 'cursors': [0, 0]},
])
def test_a_state_that_does_not_fit_the_domains_is_refused(state):
    order = ProbeOrder([20, 9], seed=SEED)
    with pytest.raises(ValueError):
        order.load_state_dict(state)
    assert order.state_dict() == {'passes': [0, 0], 'cursors': [0, 0]}


# ---- probe_batch on a real mixture ---------------------------------------------------------------


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> MixtureDataset:
    """One dataset for the module (streaming leaks descriptors per StreamingDataset); each test builds loaders."""
    dirs = write_domains(str(tmp_path_factory.mktemp('mds')), SIZES, seq_len=SEQ_LEN)
    return MixtureDataset([DomainSource(f'd{k}', d) for k, d in enumerate(dirs)])


def build(dataset: MixtureDataset):
    """A fresh loader (planner, sampler, probe order at zero), as after a restart."""
    return build_mixture_dataloader(dataset, BATCH, num_workers=0, seed=SEED, rank=0, world_size=1)


def probe_ids(batch: dict[str, torch.Tensor], domain: int) -> list[int]:
    """The batch's sample ids, after checking that every row holds the tokens of (domain, sample_id)."""
    ids = batch['sample_id'].tolist()
    assert batch['domain'].tolist() == [domain] * len(ids)
    expected = np.stack([sample_tokens(domain, i, SEQ_LEN) for i in ids]).astype(np.int64)
    assert torch.equal(batch['input_ids'], torch.from_numpy(expected))
    return ids


def train(dataset: MixtureDataset, loader, steps: int, check_interval: int = 2) -> dict[int, list[list[int]]]:
    """Take ``steps`` batches; at every check step probe 4 samples of each domain, as PiKE does.

    PiKE probes at BEFORE_TRAIN_BATCH, after the step's batch reached the trainer. Returns the probe
    sample ids per check step and domain.
    """
    probes = {}
    batches = iter(loader)
    for _ in range(steps):
        next(batches)
        step = dataset.sampler.consumed - 1
        if step % check_interval == 0:
            probes[step] = [probe_ids(dataset.probe_batch(k, 4), k) for k in range(len(SIZES))]
    batches.close()
    return probes


@pytest.mark.parametrize('num_chunks', [1, 2])
@pytest.mark.parametrize('world_size', [1, 2, 4])
def test_the_ranks_slices_of_every_chunk_make_up_the_single_rank_probe(dataset, world_size, num_chunks):
    build(dataset)
    for domain, size in enumerate(SIZES):
        dataset.probe_batch(domain, 8)  # start mid-pass (the 7-sample domain in its second pass)
        start = dataset.probe_order.state_dict()
        single = probe_ids(dataset.probe_batch(domain, 16, num_chunks), domain)
        after = dataset.probe_order.state_dict()
        expected = ProbeOrder(SIZES, SEED)
        expected.load_state_dict(start)
        assert single == expected.take(domain, 16).tolist()
        slices = []
        for rank in range(world_size):  # every rank holds the same cursors and advances them alike
            dataset.probe_order.load_state_dict(start)
            slices.append(probe_ids(dataset.probe_batch(domain, 16, num_chunks, rank, world_size), domain))
            assert dataset.probe_order.state_dict() == after
        chunk = 16 // num_chunks // world_size
        joined = [i for c in range(num_chunks) for ids in slices for i in ids[c * chunk:(c + 1) * chunk]]
        assert joined == single
        if size >= 16:
            assert len(set(single)) == 16


def test_probe_samples_do_not_depend_on_how_far_training_advanced(dataset):
    loader = build(dataset)
    first = [probe_ids(dataset.probe_batch(k, 4), k) for k in range(len(SIZES))]
    batches = iter(loader)
    trained = [next(batches)['sample_id'].tolist() for _ in range(5)]
    batches.close()
    second = [probe_ids(dataset.probe_batch(k, 4), k) for k in range(len(SIZES))]

    build(dataset)  # the same probes with no training in between
    assert [probe_ids(dataset.probe_batch(k, 4), k) for k in range(len(SIZES))] == first
    assert [probe_ids(dataset.probe_batch(k, 4), k) for k in range(len(SIZES))] == second
    reference = ProbeOrder(SIZES, SEED)
    assert first == [reference.take(k, 4).tolist() for k in range(len(SIZES))]
    assert second == [reference.take(k, 4).tolist() for k in range(len(SIZES))]

    batches = iter(build(dataset))  # probing changed no training batch
    assert [next(batches)['sample_id'].tolist() for _ in range(5)] == trained
    batches.close()


def test_a_resumed_run_draws_the_probes_of_the_uninterrupted_run(dataset):
    """The checkpoint after a check step is written after that step's probe; the resumed run starts
    after the step and continues the probe order where the probe left it."""
    uninterrupted = train(dataset, build(dataset), 7)
    assert sorted(uninterrupted) == [0, 2, 4, 6]

    first = train(dataset, build(dataset), 3)  # probes at steps 0 and 2, then the step-2 checkpoint
    state = json.loads(json.dumps(dataset.state_dict(3 * BATCH, True)))  # as a checkpoint stores it
    assert state['probe_order'] == {'passes': [0, 0, 1], 'cursors': [8, 8, 1]}
    loader = build(dataset)  # a restart: every cursor at zero
    dataset.load_state_dict(state)
    assert dataset.probe_order.state_dict() == state['probe_order']
    rest = train(dataset, loader, 4)
    assert {**first, **rest} == uninterrupted


def test_a_state_without_probe_cursors_starts_the_probe_orders_from_zero(dataset):
    loader = build(dataset)
    train(dataset, loader, 3)
    state = json.loads(json.dumps(dataset.state_dict(3 * BATCH, True)))
    del state['probe_order']  # a checkpoint written before probes had an order of their own
    build(dataset)
    dataset.load_state_dict(state)
    assert dataset.probe_order.state_dict() == {'passes': [0, 0, 0], 'cursors': [0, 0, 0]}
    assert dataset.sampler.consumed == 3
    reference = ProbeOrder(SIZES, SEED)
    assert [probe_ids(dataset.probe_batch(k, 4), k) for k in range(len(SIZES))] == \
        [reference.take(k, 4).tolist() for k in range(len(SIZES))]
