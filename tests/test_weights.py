"""Tests for composer_pike.weights against the PIKE_MATH.md oracles and brute-force references."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from composer_pike.weights import (
    PikeStep,
    apply_scores,
    apportion,
    auto_zeta_ratio,
    default_min_weight,
    evidence_scores,
    precision_shares,
    balanced_coefficients,
    descent_bound_coefficients,
    epoch_cap_upper_bounds,
    kkt_update,
    kkt_weights,
    mirror_descent_scores,
    pike_scores,
    pike_update,
    project_to_bounds,
)

FAST = settings(max_examples=150, deadline=None)

ORACLE_G = np.array([1.0, 0.5, 0.2])
ORACLE_SIGMA2 = np.array([40.0, 10.0, 2.0])


def bound_objective(weights, grad, variance, **kwargs):
    """f(w) = sum_k w_k lambda_k + kappa_k w_k^2 / 2 for one or many weight rows."""
    linear, quadratic = descent_bound_coefficients(grad, variance, **kwargs)
    weights = np.atleast_2d(weights)
    return weights @ linear + 0.5 * (weights**2) @ quadratic


def example_2_1_closed_form(theta, lr, batch_size, noise_std):
    """PIKE_MATH s.4: optimal w1 for the two-task quadratic example, clipped to [0, 1]."""
    (t1, t2), (s1, s2) = np.square(theta), np.square(noise_std)
    w1 = ((s2 - s1) / batch_size + (t1 - t2) / lr + t2) / (t1 + t2)
    w1 = min(max(w1, 0.0), 1.0)
    return np.array([w1, 1.0 - w1])


def example_2_1_kkt(theta, lr, batch_size, noise_std):
    return kkt_weights(
        np.square(theta), 2.0 * np.square(noise_std), lr=lr, batch_size=batch_size
    )


# --------------------------------------------------------------------------- s.3 conceptual PiKE


def test_kkt_oracle_section_3():
    weights = kkt_weights(ORACLE_G, ORACLE_SIGMA2, lr=0.5, batch_size=32)
    np.testing.assert_allclose(weights, [0.6875, 0.3125, 0.0], rtol=0, atol=1e-12)


def test_kkt_oracle_section_3_with_conflict_constants():
    weights = kkt_weights(ORACLE_G, ORACLE_SIGMA2, lr=0.5, batch_size=32, beta=0.9, gamma=1.2)
    np.testing.assert_allclose(weights, [0.5729, 0.4271, 0.0], atol=1e-4)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_descent_bound_coefficients_values():
    linear, quadratic = descent_bound_coefficients(ORACLE_G, ORACLE_SIGMA2, lr=0.5, batch_size=32)
    np.testing.assert_allclose(linear, [-0.34375, -0.2109375, -0.0921875], atol=1e-15)
    np.testing.assert_allclose(quadratic, [0.25, 0.125, 0.05], atol=1e-15)


def test_example_2_1_oracle():
    theta, noise_std = (0.6, 0.8), (1.0, 0.5)
    expected = example_2_1_closed_form(theta, 1.0, 4, noise_std)
    np.testing.assert_allclose(expected, [0.1725, 0.8275], atol=1e-12)
    np.testing.assert_allclose(example_2_1_kkt(theta, 1.0, 4, noise_std), expected, atol=1e-12)


@pytest.mark.parametrize(
    ("theta", "lr", "batch_size", "noise_std", "clipped_w1"),
    [
        ((0.1, 1.0), 1.0, 4, (2.0, 0.0), 0.0),
        ((1.0, 0.1), 1.0, 4, (0.0, 2.0), 1.0),
        ((1.0, 0.5), 0.1, 16, (1.0, 1.0), 1.0),
        ((0.5, 1.0), 0.1, 16, (1.0, 1.0), 0.0),
    ],
)
def test_example_2_1_clipped_cases(theta, lr, batch_size, noise_std, clipped_w1):
    t1, t2 = np.square(theta)
    s1, s2 = np.square(noise_std)
    unclipped = ((s2 - s1) / batch_size + (t1 - t2) / lr + t2) / (t1 + t2)
    assert not 0.0 <= unclipped <= 1.0  # the case really is clipped
    expected = example_2_1_closed_form(theta, lr, batch_size, noise_std)
    assert expected[0] == clipped_w1
    np.testing.assert_allclose(example_2_1_kkt(theta, lr, batch_size, noise_std), expected, atol=1e-12)


nonzero_theta = st.floats(0.05, 3.0) | st.floats(-3.0, -0.05)


@FAST
@given(
    theta=st.tuples(nonzero_theta, nonzero_theta),
    lr=st.floats(0.01, 3.0),
    batch_size=st.integers(1, 256),
    noise_std=st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 5.0)),
)
def test_example_2_1_sweep(theta, lr, batch_size, noise_std):
    expected = example_2_1_closed_form(theta, lr, batch_size, noise_std)
    actual = example_2_1_kkt(theta, lr, batch_size, noise_std)
    np.testing.assert_allclose(actual, expected, atol=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_kkt_beats_dense_simplex_grid(seed):
    rng = np.random.default_rng(seed)
    grad = rng.uniform(0.01, 2.0, 3)
    variance = rng.uniform(0.0, 50.0, 3)
    kwargs = dict(
        lr=rng.uniform(0.05, 2.0),
        batch_size=int(rng.integers(1, 64)),
        smoothness=rng.uniform(0.2, 3.0),
        beta=rng.uniform(0.5, 1.0),
        gamma=rng.uniform(0.5, 2.0),
    )
    weights = kkt_weights(grad, variance, **kwargs)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0, abs=1e-12)

    steps = 300
    i, j = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    grid = np.stack([i[keep], j[keep], steps - i[keep] - j[keep]], axis=1) / steps
    random_points = rng.dirichlet(np.ones(3), 2000)
    candidates = np.concatenate([grid, random_points])
    best_value = bound_objective(weights, grad, variance, **kwargs)[0]
    assert best_value <= bound_objective(candidates, grad, variance, **kwargs).min() + 1e-12


def test_kkt_zero_and_inactive_domains():
    grad = np.array([1.0, -0.3, 0.0, 0.5, np.nan])
    variance = np.array([40.0, 1.0, 1.0, 10.0, np.nan])
    active = np.array([True, True, True, True, False])
    weights = kkt_weights(grad, variance, lr=0.5, batch_size=32, active=active)
    np.testing.assert_allclose(weights, [0.6875, 0.0, 0.0, 0.3125, 0.0], atol=1e-12)


def test_kkt_all_zero_gradients_keep_previous_or_uniform():
    grad, variance = np.zeros(4), np.ones(4)
    active = np.array([True, True, False, True])
    previous = np.array([0.5, 0.2, 0.2, 0.1])
    kept = kkt_weights(grad, variance, lr=1.0, batch_size=8, previous=previous, active=active)
    np.testing.assert_allclose(kept, [0.625, 0.25, 0.0, 0.125])
    uniform = kkt_weights(grad, variance, lr=1.0, batch_size=8, active=active)
    np.testing.assert_allclose(uniform, [1 / 3, 1 / 3, 0.0, 1 / 3])


def test_kkt_validation():
    with pytest.raises(ValueError, match="per_sample_variances"):
        kkt_weights([1.0, 2.0], [1.0], lr=1.0, batch_size=4)
    with pytest.raises(ValueError, match="grad_sq_norms"):
        kkt_weights([1.0, np.inf], [1.0, 1.0], lr=1.0, batch_size=4)
    with pytest.raises(ValueError, match="gamma"):
        kkt_weights([1.0, 2.0], [1.0, 1.0], lr=1.0, batch_size=4, gamma=0.0)
    with pytest.raises(ValueError, match="lr"):
        kkt_weights([1.0, 2.0], [1.0, 1.0], lr=0.0, batch_size=4)


def test_kkt_update_is_the_projected_minimiser_and_not_cumulative():
    """One conceptual-PiKE check: kkt_weights projected onto [floor, cap]; the scores are the log change,
    and the result does not depend on where the weights were (unlike Algorithm 1)."""
    grad, variance = np.array([1.0, 0.5, 0.2, 0.01]), np.array([40.0, 10.0, 2.0, 1.0])
    kwargs = dict(lr=0.5, batch_size=32, smoothness=1.0, min_weight=0.1, max_weight=0.6)
    optimum = kkt_weights(grad, variance, lr=0.5, batch_size=32)
    expected = project_to_bounds(optimum, 0.1, 0.6)
    assert optimum[3] < 0.1  # the floor binds on the last domain
    for start in (np.full(4, 0.25), np.array([0.7, 0.1, 0.1, 0.1])):
        step = kkt_update(np.log(start), grad, variance, **kwargs)
        assert not step.skipped and step.reason == ""
        np.testing.assert_allclose(step.weights, expected, rtol=1e-12)
        np.testing.assert_allclose(step.log_weights, np.log(expected), rtol=1e-12)
        np.testing.assert_allclose(step.scores, np.log(expected) - np.log(start), rtol=1e-12)


def test_kkt_update_inactive_domains_cap_below_floor_and_fallback():
    grad, variance = np.array([1.0, 0.5, 0.3]), np.array([4.0, 1.0, 1.0])
    active = np.array([True, True, False])
    start = np.array([np.log(0.5), np.log(0.5), -np.inf])
    step = kkt_update(start, grad, variance, lr=0.5, batch_size=8, smoothness=1.0, active=active, min_weight=0.3,
                      max_weight=np.array([0.2, 1.0, 1.0]))
    np.testing.assert_allclose(step.weights, [0.2, 0.8, 0.0])  # the cap (data availability) wins over the floor
    assert step.log_weights[2] == -np.inf and step.scores[2] == 0.0
    no_signal = kkt_update(np.log([0.6, 0.4]), np.zeros(2), np.ones(2), lr=0.5, batch_size=8, smoothness=1.0,
                           min_weight=0.1)
    np.testing.assert_allclose(no_signal.weights, [0.6, 0.4])  # no G > 0: the current weights stand


@pytest.mark.parametrize("lr, smoothness, reason", [(0.0, 1.0, "no step at learning rate 0.0"),
                                                     (0.5, 0.0, "no positive gradient to follow")])
def test_kkt_update_skips_without_a_step_or_curvature(lr, smoothness, reason):
    """Warmup from lr 0, or smoothness 0: the check is skipped; the weights are only projected."""
    start = np.log(np.array([0.96, 0.02, 0.02]))
    step = kkt_update(start, [1.0, 0.5, 0.2], [4.0, 1.0, 1.0], lr=lr, batch_size=8, smoothness=smoothness,
                      min_weight=0.05)
    assert step.skipped and reason in step.reason
    np.testing.assert_array_equal(step.scores, 0.0)
    np.testing.assert_allclose(step.weights, project_to_bounds(np.exp(start), 0.05, 1.0))


def test_kkt_large_k_sums_to_one():
    rng = np.random.default_rng(0)
    weights = kkt_weights(rng.uniform(0, 1, 512), rng.uniform(0, 100, 512), lr=0.3, batch_size=256)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert (weights >= 0).all()


# --------------------------------------------------------------------------- s.5 scores


def test_mirror_descent_reduces_to_pike_scores_at_gamma_zero():
    rng = np.random.default_rng(1)
    grad, variance, weights = rng.uniform(0, 2, 6), rng.uniform(0, 30, 6), rng.dirichlet(np.ones(6))
    alpha, eta, smoothness, beta, batch_size = 0.7, 0.3, 2.5, 0.8, 64
    mirror = mirror_descent_scores(
        grad, variance, weights, step_size=alpha, lr=eta, batch_size=batch_size,
        smoothness=smoothness, beta=beta, gamma=0.0,
    )
    plain = pike_scores(
        grad, variance, zeta1=alpha * eta * beta, zeta2=alpha * smoothness * eta**2,
        batch_size=batch_size,
    )
    np.testing.assert_allclose(mirror, plain, rtol=1e-13, atol=1e-15)


def test_mirror_descent_full_form_is_negative_bound_gradient():
    rng = np.random.default_rng(2)
    grad, variance, weights = rng.uniform(0, 2, 5), rng.uniform(0, 30, 5), rng.dirichlet(np.ones(5))
    kwargs = dict(lr=0.4, batch_size=16, smoothness=1.5, beta=0.9, gamma=1.3)
    linear, quadratic = descent_bound_coefficients(grad, variance, **kwargs)
    mirror = mirror_descent_scores(grad, variance, weights, step_size=2.0, **kwargs)
    np.testing.assert_allclose(mirror, -2.0 * (linear + quadratic * weights), rtol=1e-13)


def test_pike_scores_formula_and_loss_weights():
    scores = pike_scores([1.0, 2.0], [8.0, 0.0], zeta1=0.5, zeta2=2.0, batch_size=4,
                         loss_weights=[2.0, 0.5])
    np.testing.assert_allclose(scores, [0.5 * 2 * 1 - 2 / 8 * 8, 0.5 * 0.5 * 2])


# --------------------------------------------------------------------------- s.5/s.8 pike_update


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_pike_update_is_multiplicative_and_cumulative():
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    grad1, var1 = np.array([0.3, 0.1, 0.2, 0.05]), np.array([2.0, 1.0, 4.0, 0.5])
    grad2, var2 = np.array([0.1, 0.4, 0.1, 0.2]), np.array([1.0, 3.0, 1.0, 2.0])
    kwargs = dict(zeta1=1.0, zeta2=0.5, batch_size=100)  # floor 0.0125: not binding
    first = pike_update(np.log(prior), grad1, var1, **kwargs)
    second = pike_update(first.log_weights, grad2, var2, **kwargs)
    score1 = pike_scores(grad1, var1, **kwargs)
    score2 = pike_scores(grad2, var2, **kwargs)
    np.testing.assert_allclose(first.weights, softmax(np.log(prior) + score1), rtol=1e-12)
    np.testing.assert_allclose(second.weights, softmax(np.log(prior) + score1 + score2), rtol=1e-12)
    np.testing.assert_allclose(first.scores, score1)
    assert not first.skipped and first.reason == ""
    assert isinstance(first, PikeStep)


def test_pike_update_clips_scores():
    step = pike_update(np.zeros(3), [100.0, 0.0, 0.0], [0.0, 0.0, 1e6], zeta1=1.0, zeta2=1.0,
                       batch_size=1, score_clip=0.5, min_weight=0.0)
    np.testing.assert_allclose(step.scores, [0.5, 0.0, -0.5])
    np.testing.assert_allclose(step.weights, softmax(np.array([0.5, 0.0, -0.5])), rtol=1e-12)


def test_pike_update_floor_binds_and_is_written_back():
    step = pike_update(np.zeros(4), [5.0, 0.0, 0.0, 0.0], [0.0] * 4, zeta1=1.0, zeta2=0.0,
                       batch_size=1000, score_clip=20.0)
    floor = 0.05 / 4  # max(0.05/K, 1/b) with b = 1000
    np.testing.assert_allclose(step.weights, [1 - 3 * floor, floor, floor, floor], rtol=1e-12)
    np.testing.assert_allclose(step.log_weights, np.log(step.weights), rtol=1e-14)
    # The projection lives in log space: a zero-score step changes nothing.
    again = pike_update(step.log_weights, [1.0] * 4, [0.0] * 4, zeta1=0.0, zeta2=0.0, batch_size=1000)
    np.testing.assert_allclose(again.weights, step.weights, rtol=1e-12)


def test_pike_update_per_domain_cap_and_cap_below_floor():
    cap = np.array([0.5, 1.0, 0.001])
    step = pike_update(np.log([0.8, 0.1, 0.1]), np.zeros(3), np.ones(3), zeta1=1.0, zeta2=1.0,
                       batch_size=1, min_weight=0.01, max_weight=cap)
    assert (step.weights <= cap + 1e-15).all()
    assert step.weights[2] == pytest.approx(0.001)  # the data cap wins over the floor
    assert step.weights[0] == pytest.approx(0.5)
    assert step.weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_pike_update_equal_scores_leave_weights_unchanged():
    prior = np.array([0.15, 0.25, 0.6])
    step = pike_update(np.log(prior), [0.2, 0.2, 0.2], [3.0, 3.0, 3.0], zeta1=1.0, zeta2=0.1,
                       batch_size=4, min_weight=0.01)
    np.testing.assert_allclose(step.weights, prior, rtol=1e-13)


def test_pike_update_inactive_domains():
    log_weights = np.array([0.0, -np.inf, 0.0, 0.0])
    active = np.array([True, False, True, True])
    grad = np.array([0.2, np.nan, 0.1, 0.3])
    variance = np.array([1.0, np.nan, 1.0, 1.0])
    step = pike_update(log_weights, grad, variance, zeta1=1.0, zeta2=0.1, batch_size=4, active=active, min_weight=0.01)
    assert not step.skipped
    assert step.weights[1] == 0.0 and step.log_weights[1] == -np.inf and step.scores[1] == 0.0
    expected = softmax(pike_scores(grad[active], variance[active], zeta1=1.0, zeta2=0.1, batch_size=4))
    np.testing.assert_allclose(step.weights[active], expected, rtol=1e-12)
    # A domain that just ran out of data drops out and the rest renormalise.
    dropped = pike_update(np.log([0.5, 0.3, 0.2]), np.ones(3), np.ones(3), zeta1=0.0, zeta2=0.0,
                          batch_size=4, min_weight=0.01, active=np.array([True, True, False]))
    np.testing.assert_allclose(dropped.weights, [0.625, 0.375, 0.0], rtol=1e-12)


@pytest.mark.parametrize(
    ("grad", "variance", "loss_weights", "reason"),
    [
        ([0.1, np.nan, 0.2], [1.0, 1.0, 1.0], None, "non-finite grad_sq_norms .* \\[1\\]"),
        ([0.1, 0.1, 0.2], [1.0, 1.0, np.inf], None, "non-finite per_sample_variances .* \\[2\\]"),
        ([0.1, 0.1, 0.2], [1.0, 1.0, 1.0], [1.0, np.nan, 1.0], "non-finite loss_weights"),
        ([1e308, 0.0, 0.0], [0.0, 0.0, 0.0], None, "overflow"),
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], None, "all gradient statistics are zero"),
    ],
)
def test_pike_update_skips_bad_statistics(grad, variance, loss_weights, reason):
    prior = np.log([0.2, 0.3, 0.5])
    step = pike_update(prior, grad, variance, zeta1=10.0, zeta2=1.0, batch_size=4, min_weight=0.01,
                       loss_weights=loss_weights)
    assert step.skipped
    assert pytest.approx(step.weights, rel=1e-13) == [0.2, 0.3, 0.5]
    assert (step.scores == 0).all()
    assert re.search(reason, step.reason), step.reason


def test_pike_update_validation():
    with pytest.raises(ValueError, match="grad_sq_norms"):
        pike_update(np.zeros(3), [1.0, 1.0], [1.0, 1.0], zeta1=1.0, zeta2=1.0, batch_size=4)
    with pytest.raises(ValueError, match="infeasible"):
        pike_update(np.zeros(3), np.ones(3), np.ones(3), zeta1=1.0, zeta2=1.0, batch_size=4,
                    max_weight=0.2)
    with pytest.raises(ValueError, match="log_weights"):
        pike_update([np.nan, 0.0], np.ones(2), np.ones(2), zeta1=1.0, zeta2=1.0, batch_size=4)


@FAST
@given(
    data=st.data(),
    num_domains=st.integers(2, 8),
    clip=st.floats(0.05, 5.0),
)
def test_pike_update_is_permutation_equivariant(data, num_domains, clip):
    floats = st.floats(-3.0, 3.0)
    log_weights = np.array(data.draw(st.lists(floats, min_size=num_domains, max_size=num_domains)))
    grad = np.array(data.draw(st.lists(st.floats(-1.0, 5.0), min_size=num_domains, max_size=num_domains)))
    variance = np.array(data.draw(st.lists(st.floats(0.0, 50.0), min_size=num_domains, max_size=num_domains)))
    permutation = np.array(data.draw(st.permutations(range(num_domains))))
    kwargs = dict(zeta1=1.3, zeta2=0.7, batch_size=8, score_clip=clip)
    base = pike_update(log_weights, grad, variance, **kwargs)
    permuted = pike_update(log_weights[permutation], grad[permutation], variance[permutation], **kwargs)
    np.testing.assert_allclose(permuted.weights, base.weights[permutation], rtol=1e-10, atol=1e-14)
    assert base.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert base.weights.min() >= default_min_weight(num_domains, 8) - 1e-15


# --------------------------------------------------------------------------- s.9 evidence-driven update


def test_default_min_weight_keeps_one_sample_per_batch():
    assert default_min_weight(6, 48) == pytest.approx(1 / 48)  # 0.05/6 would be 0.4 samples of 48
    assert default_min_weight(4, 1000) == pytest.approx(0.05 / 4)
    assert default_min_weight(64, 16) == pytest.approx(1 / 64)  # more domains than slots: at most 1/K
    floor = default_min_weight(6, 48)
    counts = apportion(project_to_bounds(np.array([0.9, 0.02, 0.02, 0.02, 0.02, 0.02]), floor, 1.0), 48)
    assert counts.min() >= 1
    with pytest.raises(ValueError, match="num_active"):
        default_min_weight(0, 8)


def test_auto_zeta_ratio_is_batch_over_batch_plus_noise_scale():
    grad, variance, weights = np.array([2.0, 1.0]), np.array([300.0, 100.0]), np.array([0.5, 0.5])
    noise_scale = (0.5 * 300 + 0.5 * 100) / (0.5 * 2 + 0.5 * 1)
    assert auto_zeta_ratio(grad, variance, weights, batch_size=48) == pytest.approx(48 / (48 + noise_scale))
    # Sign change of a domain's score u = G - rho sigma^2 / (2b) at sigma^2/G = 2 (b + B).
    rho = auto_zeta_ratio(grad, variance, weights, batch_size=48)
    assert 1.0 - rho * (2 * (48 + noise_scale)) / (2 * 48) == pytest.approx(0.0, abs=1e-12)
    assert auto_zeta_ratio([-1.0, 0.0], [5.0, 5.0], [0.5, 0.5], batch_size=8) == 0.0  # no signal: no trade


def evidence(grad, variance, grad_var, weights=None, **kwargs):
    grad = np.asarray(grad, dtype=float)
    options = dict(batch_size=32, zeta_ratio=0.5, step_size=0.5, evidence_z=2.0)
    options.update(kwargs)
    return evidence_scores(grad, variance, grad_var, np.zeros_like(grad), np.zeros_like(grad),
                           np.full(grad.size, 1 / grad.size) if weights is None else weights, **options)


def test_evidence_scores_formula_without_noise():
    grad, variance = np.array([3.0, 1.0, 2.0]), np.array([64.0, 0.0, 32.0])
    result = evidence(grad, variance, np.zeros(3), evidence_z=0.0)
    score = grad - 0.5 * variance / 64
    signal = grad.mean()
    np.testing.assert_allclose(result.advantage, (score - score.mean()) / signal, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(result.scores, 0.5 * (score - score.mean()) / signal, rtol=1e-12, atol=1e-15)
    assert result.reason == "" and np.all(result.advantage_se == 0)


def test_evidence_scores_do_not_move_on_differences_within_their_errors():
    grad = np.array([1.0, 1.1, 0.9])
    still = evidence(grad, np.zeros(3), np.full(3, 0.2**2))  # differences of 0.1 against errors of 0.2
    np.testing.assert_array_equal(still.scores, np.zeros(3))
    moved = evidence(grad, np.zeros(3), np.full(3, 0.01**2))
    assert moved.scores[1] > 0 > moved.scores[2]
    # Soft thresholding: the step is what exceeds z standard errors, no more.
    expected = np.sign(moved.advantage) * np.maximum(np.abs(moved.advantage) - 2 * moved.advantage_se, 0) * 0.5
    np.testing.assert_allclose(moved.scores, expected, rtol=1e-12)


def test_evidence_scores_are_scale_free_and_permutation_equivariant():
    rng = np.random.default_rng(5)
    grad, variance, grad_var = rng.uniform(0.5, 2, 5), rng.uniform(0, 200, 5), rng.uniform(0, 0.01, 5)
    weights = rng.dirichlet(np.ones(5))
    base = evidence(grad, variance, grad_var, weights)
    scaled = evidence(grad * 1e-4, variance * 1e-4, grad_var * 1e-8, weights)  # loss scale changed
    np.testing.assert_allclose(scaled.scores, base.scores, rtol=1e-9)
    order = rng.permutation(5)
    permuted = evidence(grad[order], variance[order], grad_var[order], weights[order])
    np.testing.assert_allclose(permuted.scores, base.scores[order], rtol=1e-12)


def test_evidence_scores_skip_without_signal_or_on_bad_input():
    no_signal = evidence([0.01, -0.01], [1.0, 1.0], [1.0, 1.0])
    assert "gradient signal" in no_signal.reason and np.all(no_signal.scores == 0)
    bad = evidence([1.0, np.nan], [1.0, 1.0], [0.0, 0.0])
    assert "non-finite grad_sq_norms" in bad.reason
    inactive = evidence([1.0, np.nan, 2.0], [1.0, np.nan, 1.0], [0.0, np.nan, 0.0],
                        weights=np.array([0.5, 0.0, 0.5]), active=np.array([True, False, True]))
    assert inactive.reason == "" and inactive.scores[1] == 0 and inactive.scores[2] > 0


def test_precision_shares_weight_by_inverse_variance_plus_the_median():
    active = np.array([True, True, True, False])
    np.testing.assert_allclose(precision_shares([1.0, 4.0, 4.0, 0.0], active), [4 / 9, 5 / 18, 5 / 18, 0.0])  # 1/(V+4)
    np.testing.assert_allclose(precision_shares([1.0, 1.0, 1e6, 9.0], active), [0.5, 0.5, 0.0, 0.0], atol=1e-5)
    np.testing.assert_array_equal(precision_shares([0.0, 4.0, 0.0, 0.0], active), [0.5, 0.0, 0.5, 0.0])


def test_evidence_scores_keep_moving_after_the_heaviest_domain_is_learned():
    """90% of the weight on a domain whose G has fallen to noise, the others' G clearly positive: the
    scale (the domains' signal, not the current mixture's) stays measurable, so weight flows back to the
    others. With the mixture's signal sum_j w_j G_j as the scale, the rule froze here."""
    weights = np.array([0.9, 0.05, 0.05])
    result = evidence([0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.01, 0.01, 0.01], weights)
    assert result.reason == "", result.reason
    assert result.scores[0] <= 0 < result.scores[1] and result.scores[1] == result.scores[2]
    assert apply_scores(np.log(weights), result.scores, min_weight=0.01).weights[0] < 0.9


def test_a_very_noisy_domain_neither_moves_nor_masks_the_others():
    """As measured in the benchmark: one domain's G-hat 49 +- 62, the others 0.3-1.5 +- 0.1. A plain or
    mixture-weighted mean as reference and scale inherited the noisy domain's error, hid every difference
    and gated every update as 'no signal'; discounted by its noise, the well-measured domains are compared."""
    grad = np.array([49.0, 0.3, 0.3, 1.5, 1.5])
    result = evidence(grad, np.zeros(5), np.array([62.0, 0.1, 0.1, 0.1, 0.1]) ** 2)
    assert result.reason == "", result.reason
    assert result.scores[0] == 0  # 49 +- 62 is no evidence either way
    assert result.scores[3] == result.scores[4] > 0 > result.scores[1] == result.scores[2]


def test_evidence_scores_variance_term_and_balanced_weights():
    # Equal G, one domain twice as noisy: the noisy one loses weight (the variance term's role).
    noisy = evidence([1.0, 1.0], [10.0, 20.0], [0.0, 0.0], zeta_ratio=1.0, batch_size=4, evidence_z=0.0)
    assert noisy.scores[0] > 0 > noisy.scores[1]
    tilted = evidence([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], loss_weights=np.array([1.5, 0.5]), evidence_z=0.0)
    assert tilted.scores[0] > 0 > tilted.scores[1]


def test_evidence_scores_alignment_terms():
    """Equal G's; domains 0 and 1 share a direction, domain 2 is orthogonal to both: with the alignment
    terms (the descent of the whole objective per unit weight, also the step's unit) 0 and 1 gain on 2;
    zero inner products change nothing; the inner products' variance enters the standard errors."""
    grad = [1.0, 1.0, 1.0]
    aligned = np.array([[0.0, 0.8, 0.0], [0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    exact = evidence(grad, np.zeros(3), np.zeros(3), evidence_z=0.0, inner_products=aligned,
                     inner_product_var=np.zeros((3, 3)))
    score = np.array([1.8, 1.8, 1.0])  # in units of the whole objective's descent per unit weight
    np.testing.assert_allclose(exact.advantage, (score - score.mean()) / score.mean(), rtol=1e-12)
    plain = evidence(grad, np.zeros(3), np.full(3, 0.01))
    zero = evidence(grad, np.zeros(3), np.full(3, 0.01), inner_products=np.zeros((3, 3)),
                    inner_product_var=np.zeros((3, 3)))
    np.testing.assert_array_equal(zero.scores, plain.scores)
    noisy = evidence(grad, np.zeros(3), np.full(3, 0.01), inner_products=aligned, inner_product_var=np.full((3, 3), 0.09))
    assert noisy.reason == "" and np.all(noisy.advantage_se > 0.2) and np.all(noisy.scores == 0)  # within 2 SE
    tilted = evidence(grad, np.zeros(3), np.zeros(3), evidence_z=0.0, loss_weights=np.array([1.0, 1.0, 3.0]),
                      inner_products=np.array([[0, 0, 0.5], [0, 0, 0], [0.5, 0, 0]]), inner_product_var=np.zeros((3, 3)))
    # u = y_k G_k + sum_j y_j X_jk = [1 + 3 * 0.5, 1, 3 + 0.5], in units of their mean
    np.testing.assert_allclose(tilted.advantage, (np.array([2.5, 1.0, 3.5]) - 7 / 3) / (7 / 3), rtol=1e-12)
    with pytest.raises(ValueError, match="inner_products must have shape"):
        evidence(grad, np.zeros(3), np.zeros(3), inner_products=np.zeros((2, 2)), inner_product_var=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="needs inner_product_var"):
        evidence(grad, np.zeros(3), np.zeros(3), inner_products=np.zeros((3, 3)))


def test_apply_scores_clips_renormalises_and_floors():
    step = apply_scores(np.log([0.5, 0.5]), np.array([3.0, -3.0]), score_clip=1.0, min_weight=0.1)
    np.testing.assert_allclose(step.scores, [1.0, -1.0])
    np.testing.assert_allclose(step.weights, softmax(np.array([1.0, -1.0])), rtol=1e-12)
    floored = apply_scores(np.log([0.5, 0.5]), np.array([3.0, -3.0]), score_clip=5.0, min_weight=0.2)
    assert floored.weights[1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="scores must be finite"):
        apply_scores(np.zeros(2), np.array([np.nan, 0.0]), min_weight=0.1)


# --------------------------------------------------------------------------- s.6 Balanced-PiKE


def test_balanced_tau_zero_is_exactly_plain_pike():
    losses = np.array([2.0, 3.5, 1.0, 7.0, 2.2])
    np.testing.assert_array_equal(balanced_coefficients(losses, 0.0), np.ones(5))
    grad, variance = np.array([0.3, 0.1, 0.5, 0.2, 0.4]), np.array([3.0, 1.0, 2.0, 8.0, 0.5])
    kwargs = dict(zeta1=0.8, zeta2=0.4, batch_size=16)
    plain = pike_update(np.zeros(5), grad, variance, **kwargs)
    exact = pike_update(np.zeros(5), grad, variance, loss_weights=balanced_coefficients(losses, 0.0), **kwargs)
    np.testing.assert_array_equal(exact.weights, plain.weights)
    tiny = pike_update(np.zeros(5), grad, variance, loss_weights=balanced_coefficients(losses, 1e-9), **kwargs)
    np.testing.assert_allclose(tiny.weights, plain.weights, rtol=1e-8)


def test_balanced_large_tau_concentrates_on_worst_loss():
    coefficients = balanced_coefficients([2.0, 3.5, 1.0, 3.4], 200.0)
    assert coefficients[1] == pytest.approx(4.0, rel=1e-6)
    assert coefficients.mean() == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize("tau", [0.5, 3.0, 5.0])
def test_balanced_mean_one_and_overflow_safe(tau):
    losses = np.array([1e4, 2e4, 1.5e4, -3e3])
    coefficients = balanced_coefficients(losses, tau)
    assert np.isfinite(coefficients).all()
    assert coefficients.mean() == pytest.approx(1.0, rel=1e-14)
    assert np.argmax(coefficients) == 1


def test_balanced_inactive_and_validation():
    coefficients = balanced_coefficients([1.0, np.nan, 1.0], 3.0, active=np.array([True, False, True]))
    np.testing.assert_allclose(coefficients, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="tau"):
        balanced_coefficients([1.0, 2.0], -1.0)
    with pytest.raises(ValueError, match="domain 2"):
        balanced_coefficients([1.0, 2.0, np.inf], 1.0)


# --------------------------------------------------------------------------- s.8 bounds and projection


def bisection_projection(weights, lower, upper):
    """Reference: shift nu by bisection so that sum(clip(w - nu, lower, upper)) == 1."""
    low, high = (weights - upper).min() - 1.0, (weights - lower).max() + 1.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if np.clip(weights - middle, lower, upper).sum() > 1.0:
            low = middle
        else:
            high = middle
    return np.clip(weights - 0.5 * (low + high), lower, upper)


@FAST
@given(data=st.data(), num_domains=st.integers(1, 12))
def test_project_to_bounds_matches_bisection_and_kkt(data, num_domains):
    vector = st.lists(st.floats(0.0, 1.0), min_size=num_domains, max_size=num_domains)
    weights = np.array(data.draw(st.lists(st.floats(-2.0, 2.0), min_size=num_domains, max_size=num_domains)))
    raw_lower = np.array(data.draw(vector)) / num_domains
    raw_upper = raw_lower + np.array(data.draw(vector))
    assume(raw_lower.sum() <= 1.0 <= raw_upper.sum())
    projected = project_to_bounds(weights, raw_lower, raw_upper)
    assert projected.sum() == pytest.approx(1.0, abs=1e-9)
    assert (projected >= raw_lower - 1e-12).all() and (projected <= raw_upper + 1e-12).all()
    np.testing.assert_allclose(projected, bisection_projection(weights, raw_lower, raw_upper), atol=1e-9)
    # KKT: coordinates strictly inside their box share one shift nu = w - x; those at a bound
    # are consistent with it (at lower: w - nu <= lower; at upper: w - nu >= upper).
    free = (projected > raw_lower + 1e-9) & (projected < raw_upper - 1e-9)
    if free.any():
        shift = weights[free] - projected[free]
        np.testing.assert_allclose(shift, shift[0], atol=1e-9)
        wide = raw_upper - raw_lower > 1e-6  # a box this narrow is both bounds at once
        at_lower = ~free & wide & np.isclose(projected, raw_lower, rtol=0, atol=1e-9)
        at_upper = ~free & wide & np.isclose(projected, raw_upper, rtol=0, atol=1e-9)
        assert (weights[at_lower] - shift[0] <= raw_lower[at_lower] + 1e-8).all()
        assert (weights[at_upper] - shift[0] >= raw_upper[at_upper] - 1e-8).all()


def test_project_to_bounds_identity_inside_box_and_inactive():
    weights = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_to_bounds(weights, 0.1, 0.9), weights, rtol=1e-15)
    projected = project_to_bounds([0.7, 123.0, 0.7], 0.0, 1.0, active=np.array([True, False, True]))
    np.testing.assert_allclose(projected, [0.5, 0.0, 0.5])
    np.testing.assert_allclose(project_to_bounds([0.9, 0.05, 0.05], 0.1, 0.6), [0.6, 0.2, 0.2])
    np.testing.assert_allclose(project_to_bounds([3.0, 1.0], 0.0, np.inf), [1.0, 0.0])


def test_project_to_bounds_tight_bounds():
    np.testing.assert_allclose(project_to_bounds([5.0, -1.0], 0.5, 0.7), [0.5, 0.5])
    np.testing.assert_allclose(project_to_bounds([5.0, -1.0], [0.2, 0.0], [0.2, 0.8]), [0.2, 0.8])


def test_project_to_bounds_infeasible():
    with pytest.raises(ValueError, match=r"sum\(lower\) = 1\.2"):
        project_to_bounds([0.5, 0.5], 0.6, 1.0)
    with pytest.raises(ValueError, match=r"sum\(upper\) = 0\.8"):
        project_to_bounds([0.5, 0.5], 0.0, 0.4)
    with pytest.raises(ValueError, match="lower > upper for domain 1"):
        project_to_bounds([0.5, 0.5], [0.0, 0.5], [1.0, 0.4])
    with pytest.raises(ValueError, match="upper"):
        project_to_bounds([0.5, 0.5], 0.0, [1.0, 1.0, 1.0])


def test_epoch_cap_upper_bounds():
    caps = epoch_cap_upper_bounds([1000, 50, 0, 10_000], 400, 2.0, samples_consumed=[0, 20, 0, 0])
    np.testing.assert_allclose(caps, [1.0, 0.2, 0.0, 1.0])
    tight = epoch_cap_upper_bounds([100, 100], 1000, 1.0)
    np.testing.assert_allclose(tight, [0.1, 0.1])
    spent = epoch_cap_upper_bounds([100], 10, 1.0, samples_consumed=[150])
    np.testing.assert_allclose(spent, [0.0])
    np.testing.assert_allclose(epoch_cap_upper_bounds([0, 5], 10, np.inf), [1.0, 1.0])
    with pytest.raises(ValueError, match="samples_remaining"):
        epoch_cap_upper_bounds([1, 2], 0, 1.0)
    with pytest.raises(ValueError, match="samples_consumed"):
        epoch_cap_upper_bounds([1, 2], 10, 1.0, samples_consumed=[1.0])


def test_epoch_caps_drive_pike_update():
    caps = epoch_cap_upper_bounds([1000, 30, 1000], 100, 1.0)
    step = pike_update(np.zeros(3), [0.0, 5.0, 0.0], [0.0] * 3, zeta1=1.0, zeta2=0.0,
                       batch_size=8, score_clip=10.0, max_weight=caps)
    np.testing.assert_allclose(step.weights, [0.35, 0.3, 0.35], rtol=1e-12)


# --------------------------------------------------------------------------- s.8 apportionment


def hamilton_oracle(weights, total, min_count):
    """Unit-at-a-time reference for apportion (plain Python loops)."""
    weights = np.asarray(weights, dtype=float)
    positive = [k for k in range(len(weights)) if weights[k] > 0]
    if min_count and total < min_count * len(positive):
        counts = [0] * len(weights)
        left = total
        for k in sorted(positive, key=lambda k: (-weights[k], k)):
            counts[k] = min(min_count, left)
            left -= counts[k]
        return counts
    quota = total * (weights / weights.sum())
    counts = [int(np.floor(q)) for q in quota]
    by_remainder = sorted(positive, key=lambda k: (-(quota[k] - counts[k]), k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    for k in positive:
        while counts[k] < min_count:
            donors = [j for j in positive if counts[j] > min_count]
            donor = max(donors, key=lambda j: (counts[j] - quota[j], j))
            counts[donor] -= 1
            counts[k] += 1
    return counts


weight_lists = st.lists(
    st.floats(0.0, 1.0) | st.just(0.0) | st.floats(1e-6, 1e-3), min_size=1, max_size=20
).filter(lambda w: sum(w) > 0)


@FAST
@given(weights=weight_lists, total=st.integers(0, 300), min_count=st.integers(0, 3))
def test_apportion_matches_oracle(weights, total, min_count):
    counts = apportion(weights, total, min_count=min_count)
    assert counts.dtype == np.int64
    assert counts.sum() == total
    assert counts.tolist() == hamilton_oracle(weights, total, min_count)
    weights = np.asarray(weights)
    assert (counts[weights == 0] == 0).all()
    positive = weights > 0
    if min_count == 0:
        quota = total * weights / weights.sum()
        assert (np.floor(quota) <= counts).all() and (counts <= np.ceil(quota)).all()
    elif total >= min_count * positive.sum():
        assert (counts[positive] >= min_count).all()


def test_apportion_deterministic_ties_and_min_count_examples():
    np.testing.assert_array_equal(apportion([1, 1, 1], 4), [2, 1, 1])
    np.testing.assert_array_equal(apportion([1, 1, 1, 1], 2), [1, 1, 0, 0])
    np.testing.assert_array_equal(apportion([0.5, 0.3, 0.2, 0.0, 1e-3], 10, min_count=1), [4, 3, 2, 0, 1])
    # Not enough samples for every positive domain: the heaviest ones get one each.
    np.testing.assert_array_equal(apportion([0.1, 0.5, 0.0, 0.5, 0.2], 2, min_count=1), [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(apportion([1.0, 2.0], 0), [0, 0])


def test_apportion_large_k():
    rng = np.random.default_rng(4)
    weights = rng.dirichlet(np.ones(256))
    counts = apportion(weights, 256, min_count=1)
    assert counts.sum() == 256 and counts.min() >= 1
    assert apportion(weights, 10_000).sum() == 10_000


@pytest.mark.parametrize(
    ("weights", "total", "message"),
    [
        ([[0.5, 0.5]], 4, "1-D"),
        ([0.5, np.nan], 4, "finite"),
        ([0.5, -0.1], 4, ">= 0"),
        ([0.0, 0.0], 4, "positive sum"),
        ([0.5, 0.5], -1, "total"),
        ([0.5, 0.5], 4.0, "total"),
        ([0.5, 0.5], True, "total"),
    ],
)
def test_apportion_validation(weights, total, message):
    with pytest.raises(ValueError, match=message):
        apportion(weights, total)


def test_apportion_rejects_bad_min_count():
    with pytest.raises(ValueError, match="min_count"):
        apportion([1.0], 3, min_count=-1)


def test_apportion_all_pairs_small_exhaustive():
    for a, b, total in itertools.product(range(4), range(4), range(6)):
        if a + b == 0:
            continue
        counts = apportion([a, b], total, min_count=1)
        assert counts.tolist() == hamilton_oracle([a, b], total, 1)
