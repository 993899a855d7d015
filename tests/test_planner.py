"""Unit tests of the pure mixture planner: counts, passes, schedules, exhaustion, resumption."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from composer_pike.data.planner import MixturePlanner, shard_block_order


def assert_largest_remainder(counts, weights, total, tol=1e-9):
    """Hamilton apportionment, checked from its definition (independently of composer_pike.weights): the
    counts sum to ``total``, each is its quota rounded down or up, and every domain rounded up has a
    fractional part at least as large as every domain rounded down. ``tol`` absorbs float rounding, under
    which quotas that tie (weights 1.0 and 0.9999999999999999) may be ordered either way."""
    counts = np.asarray(counts)
    quotas = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    assert counts.sum() == total
    assert (np.abs(counts - quotas) < 1 + tol).all(), (counts.tolist(), quotas.tolist())
    up, down = counts > quotas + tol, counts < quotas - tol
    if up.any() and down.any():  # fractional parts: q - (c - 1) where rounded up, q - c where rounded down
        rounded_up, rounded_down = (quotas - counts + 1)[up], (quotas - counts)[down]
        assert rounded_up.min() >= rounded_down.max() - tol, (counts.tolist(), quotas.tolist())


def planned_counts(batch, num_domains):
    return np.bincount(batch.domains, minlength=num_domains)


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=8), batch=st.integers(16, 96))
def test_mix_counts_match_largest_remainder(weights, batch):
    planner = MixturePlanner([1000] * len(weights), batch, weights=weights, min_per_domain=0)
    counts = planned_counts(planner.plan_next(), len(weights))
    assert_largest_remainder(counts, weights, batch)


def test_largest_remainder_check_catches_a_wrong_apportionment():
    """The check above fails a count that rounds a smaller fractional part up (its power)."""
    assert_largest_remainder([1, 1, 2], [1.0, 1.0, 1.0], 4)  # a three-way tie: any order is right
    assert_largest_remainder([2, 1, 1], [1.4, 1.2, 1.4], 4)  # quotas 1.4, 1.2, 1.4: either 1.4 goes up
    assert_largest_remainder([1, 1, 2], [1.4, 1.2, 1.4], 4)
    with pytest.raises(AssertionError):
        assert_largest_remainder([1, 2, 1], [1.4, 1.2, 1.4], 4)  # ... never the 1.2
    with pytest.raises(AssertionError):
        assert_largest_remainder([3, 0, 1], [1.0, 1.0, 1.0], 4)  # off by more than one


def test_mix_gives_every_active_domain_a_sample_when_possible():
    planner = MixturePlanner([100] * 4, 8, weights=[0.97, 0.01, 0.01, 0.01])
    assert planned_counts(planner.plan_next(), 4).min() >= 1


def test_each_pass_reads_every_sample_once_and_passes_differ():
    sizes = [37, 20]
    planner = MixturePlanner(sizes, 6, weights=[0.5, 0.5], shard_sizes=[[10, 10, 10, 7], [20]], seed=3)
    seen = {0: [], 1: []}
    while planner.epochs.min() < 2:
        batch = planner.plan_next()
        for k in (0, 1):
            seen[k].extend(batch.indices[batch.domains == k].tolist())
    for k, n in enumerate(sizes):
        assert sorted(seen[k][:n]) == list(range(n))
        assert sorted(seen[k][n:2 * n]) == list(range(n))
        assert seen[k][:n] != seen[k][n:2 * n]


def test_shard_block_order_is_a_permutation_that_keeps_blocks_together():
    sizes = [5, 5, 5, 5, 5, 5]
    order = shard_block_order(sizes, np.random.default_rng(0), block_shards=2)
    assert sorted(order.tolist()) == list(range(30))
    shard_of = order // 5
    assert all(len(set(shard_of[i:i + 10].tolist())) == 2 for i in range(0, 30, 10))


def test_batches_are_sorted_by_domain_and_rank_slices_tile_the_batch():
    planner = MixturePlanner([50, 50, 50], 12, weights=[0.2, 0.3, 0.5])
    batch = planner.plan_next()
    assert np.all(np.diff(batch.domains) >= 0)
    parts = [batch.rank_slice(r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate([d for d, _ in parts]), batch.domains)
    assert np.array_equal(np.concatenate([i for _, i in parts]), batch.indices)


def test_same_seed_same_plan_other_seed_other_plan():
    def plan(seed):
        planner = MixturePlanner([40, 40], 8, seed=seed)
        return np.concatenate([planner.plan_next().indices for _ in range(5)])
    assert np.array_equal(plan(1), plan(1))
    assert not np.array_equal(plan(1), plan(2))


def test_resume_from_state_dict_after_a_weight_change_matches_uninterrupted():
    def make():
        return MixturePlanner([53, 31, 17], 9, weights=[0.5, 0.3, 0.2], seed=7, shard_sizes=[[20, 20, 13], [31], [17]])
    reference = make()
    reference.schedule_weights([0.1, 0.1, 0.8], effective_step=4)
    expected = [reference.plan_next() for _ in range(30)]

    first = make()
    first.schedule_weights([0.1, 0.1, 0.8], effective_step=4)
    got = [first.plan_next() for _ in range(11)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    got += [resumed.plan_next() for _ in range(19)]
    for a, b in zip(expected, got):
        assert a.step == b.step
        assert np.array_equal(a.domains, b.domains) and np.array_equal(a.indices, b.indices)


def test_weights_apply_from_their_effective_step():
    planner = MixturePlanner([100, 100], 10, weights=[0.5, 0.5])
    planner.schedule_weights([0.9, 0.1], effective_step=3)
    counts = [planned_counts(planner.plan_next(), 2).tolist() for _ in range(5)]
    assert counts == [[5, 5]] * 3 + [[9, 1]] * 2


@pytest.mark.parametrize('bad', [[np.nan, 1.0], [-0.1, 1.1], [0.5, 0.3, 0.2], [0.0, 0.0]])
def test_bad_weights_raise_and_leave_the_schedule_unchanged(bad):
    planner = MixturePlanner([10, 10], 4, weights=[0.25, 0.75])
    before = planner.state_dict()
    with pytest.raises(ValueError, match='weights'):
        planner.schedule_weights(bad, effective_step=2)
    assert planner.state_dict() == before


def test_scheduling_for_an_already_planned_step_is_refused():
    planner = MixturePlanner([10, 10], 4)
    for _ in range(3):
        planner.plan_next()
    with pytest.raises(ValueError, match='already planned'):
        planner.schedule_weights([0.5, 0.5], effective_step=2)


def test_random_batching_draws_whole_batches_by_weight():
    planner = MixturePlanner([10_000, 10_000], 4, weights=[0.8, 0.2], batching='random', seed=0)
    picks = []
    for _ in range(2000):
        domains = planner.plan_next().domains
        assert len(set(domains.tolist())) == 1
        picks.append(domains[0])
    share = np.mean(np.array(picks) == 0)
    assert abs(share - 0.8) < 4 * np.sqrt(0.8 * 0.2 / 2000)


def test_round_robin_cycles_through_domains():
    planner = MixturePlanner([100, 100, 100], 4, batching='round_robin')
    planned = [planner.plan_next() for _ in range(6)]
    assert [int(batch.domains[0]) for batch in planned] == [0, 1, 2, 0, 1, 2]
    # counts_at(step) describes that step's batch, not the planner's position (MixtureMonitor reads it
    # for steps the loader planned ahead of)
    for batch in planned:
        assert planner.counts_at(batch.step).tolist() == planned_counts(batch, 3).tolist()


def test_repeat_policy_counts_passes():
    planner = MixturePlanner([10, 100], 10, weights=[0.5, 0.5])
    for _ in range(6):
        planner.plan_next()
    assert planner.epochs.tolist() == [3, 0]
    np.testing.assert_allclose(planner.domain_epochs(), [3.0, 0.3])


def test_drop_policy_keeps_batches_full_and_renormalises():
    planner = MixturePlanner([10, 100], 8, weights=[0.5, 0.5], on_exhausted='drop')
    counts = [planned_counts(planner.plan_next(), 2).tolist() for _ in range(4)]
    assert counts == [[4, 4], [4, 4], [2, 6], [0, 8]]
    assert planner.active.tolist() == [False, True]
    np.testing.assert_allclose(planner.active_weights(planner.step), [0.0, 1.0])


def test_drop_policy_finishes_when_every_domain_is_dropped():
    planner = MixturePlanner([8, 8], 4, on_exhausted='drop')
    batches = 0
    while planner.plan_next() is not None:
        batches += 1
    assert batches == 4 and planner.finished


@pytest.mark.parametrize('batching', ['mix', 'round_robin'])
def test_drop_policy_finishes_when_only_domains_of_weight_zero_are_left(batching):
    """Domain 0, the only one with weight, runs out mid-batch (10 samples, batches of 4): the mixture ends
    there instead of failing to share the rest of the batch among weights that sum to 0."""
    planner = MixturePlanner([10, 100], 4, weights=[1.0, 0.0], on_exhausted='drop', batching=batching)
    batches = []
    while (batch := planner.plan_next()) is not None:
        batches.append(planned_counts(batch, 2).tolist())
    assert planner.finished and planner.active.tolist() == [False, True]
    assert batches == ([[4, 0], [4, 0]] if batching == 'mix' else [[4, 0], [0, 4], [4, 0], [0, 4]])


def test_stop_policy_stops_before_a_second_pass():
    planner = MixturePlanner([10, 100], 8, weights=[0.5, 0.5], on_exhausted='stop')
    batches = 0
    while planner.plan_next() is not None:
        batches += 1
    assert batches == 2 and planner.finished and planner.epochs.tolist() == [0, 0]


def test_stop_policy_stops_when_a_batch_ends_a_pass_exactly():
    """4 of domain 0's 12 samples per batch: the third batch takes the last 4 and wraps the cursor to 0;
    the fourth would start a second pass (it used to, for ever)."""
    planner = MixturePlanner([12, 100], 8, weights=[0.5, 0.5], on_exhausted='stop')
    batches = 0
    while planner.plan_next() is not None:
        batches += 1
    assert batches == 3 and planner.finished and planner.epochs.tolist() == [1, 0]


@pytest.mark.parametrize('kwargs, match', [
    (dict(batching='mixed'), 'batching'),
    (dict(on_exhausted='wrap'), 'on_exhausted'),
    (dict(shuffle_block_shards=0), 'shuffle_block_shards'),
])
def test_bad_planner_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixturePlanner([10, 10], 4, **kwargs)
