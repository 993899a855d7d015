"""Loss-slope mixing: the elasticity fit (stats.loss_trend), its target weights (weights.elasticity), simulated
known answers in closed loop, and the per-sample loss the algorithm reads off the logits."""
import numpy as np
import pytest
import torch

from composer_pike.algorithms.loss_slope import LossSlope, per_sample_losses
from composer_pike.stats import LossTrend, mean_log_samples
from composer_pike.weights import apply_scores, balanced_coefficients, default_min_weight, elasticity_scores


def test_mean_log_samples_is_the_mean_of_log_over_the_bin():
    for start, end in ((0, 40), (40, 80), (1000, 1300)):
        grid = np.linspace(start, end, 2_000_001)[1:]
        assert mean_log_samples(start, end) == pytest.approx(np.log(grid).mean(), abs=1e-4)
    assert mean_log_samples(50, 50) == pytest.approx(np.log(50))


def add_power_law_bins(trend: LossTrend, rng, per_bin: np.ndarray, floors: np.ndarray, scales: np.ndarray,
                       exponent: float, noise: np.ndarray, bins: int) -> None:
    """Bins of samples whose losses follow L_k(n) = floor_k + scale_k n^-exponent plus Gaussian noise_k."""
    for _ in range(bins):
        seen = trend.samples_seen
        sums, squares = np.zeros(trend.num_domains), np.zeros(trend.num_domains)
        for k in range(trend.num_domains):
            n = seen[k] + np.arange(1, per_bin[k] + 1)
            losses = floors[k] + scales[k] * n ** -exponent + noise[k] * rng.standard_normal(n.size)
            sums[k], squares[k] = losses.sum(), (losses**2).sum()
        trend.add_bin(sums, squares, per_bin)


def test_elasticity_recovers_a_log_law_and_its_standard_error_covers_at_nominal_rate():
    """L = a - e log n: the fitted e is unbiased and +-1.96 SE covers the truth about 95% of the time."""
    rng = np.random.default_rng(0)
    truth = np.array([0.5, 0.2, 0.0])
    covered, fits = 0, []
    for _ in range(300):
        trend = LossTrend(3)
        for _ in range(12):
            seen = trend.samples_seen
            n = seen[:, None] + np.arange(1, 51)[None, :]
            losses = 4.0 - truth[:, None] * np.log(n) + 0.8 * rng.standard_normal(n.shape)
            trend.add_bin(losses.sum(1), (losses**2).sum(1), np.full(3, 50))
        elasticity, se, bins = trend.elasticities(window=2.0)
        assert (bins == 6).all()  # bins starting at or after 300 of 600 samples
        fits.append(elasticity)
        covered += np.abs(elasticity - truth) <= 1.96 * se
    fits = np.array(fits)
    assert (np.abs(fits.mean(0) - truth) < 4 * fits.std(0) / np.sqrt(len(fits))).all()  # unbiased
    assert ((covered / 300) > 0.9).all() and ((covered / 300) < 0.99).all()


def test_window_drops_the_early_transient_of_a_domain_with_nothing_left_to_learn():
    """Random characters learn their alphabet (loss falls early), then stay at the entropy: over the
    last doubling of samples their elasticity is 0 within its error, over the whole run it is not."""
    rng = np.random.default_rng(1)
    trend = LossTrend(2)
    for _ in range(40):
        seen = trend.samples_seen
        n = seen[:, None] + np.arange(1, 31)[None, :]
        alphabet = 4.0 + 1.5 * np.exp(-n[0] / 100.0)  # learned within the first few hundred samples
        real = 2.0 + 3.0 * n[1] ** -0.3
        losses = np.stack([alphabet, real]) + 0.1 * rng.standard_normal(n.shape)
        trend.add_bin(losses.sum(1), (losses**2).sum(1), np.full(2, 30))
    recent, recent_se, _ = trend.elasticities(window=2.0)
    whole, whole_se, _ = trend.elasticities(window=1e9)
    assert abs(recent[0]) < 3 * recent_se[0] and recent[1] > 5 * recent_se[1]
    assert whole[0] > 3 * whole_se[0]


def test_elasticities_need_two_bins_and_state_round_trips():
    trend = LossTrend(2)
    assert np.isnan(trend.elasticities(2.0)[0]).all()
    trend.add_bin([10.0, 20.0], [21.0, 81.0], [5, 5])
    assert np.isnan(trend.elasticities(2.0)[0]).all()
    add_power_law_bins(trend, np.random.default_rng(2), np.array([20, 40]), np.array([1.0, 2.0]),
                       np.array([3.0, 3.0]), 0.3, np.array([0.2, 0.2]), 6)
    copy = LossTrend(2)
    copy.load_state_dict(trend.state_dict())
    np.testing.assert_array_equal(copy.elasticities(2.0)[0], trend.elasticities(2.0)[0])
    np.testing.assert_array_equal(copy.latest_losses(), trend.latest_losses())
    sparse = LossTrend(3)
    assert np.isnan(sparse.latest_losses()).all()
    sparse.add_bin([4.0, 6.0, 0.0], [8.0, 18.0, 0.0], [2, 3, 0])
    sparse.add_bin([5.0, 0.0, 0.0], [25.0, 0.0, 0.0], [1, 0, 0])  # domain 1 had no sample in the last bin
    np.testing.assert_array_equal(sparse.latest_losses(), [5.0, 2.0, np.nan])
    with pytest.raises(ValueError, match='counts has 3 entries for 2 domains'):
        trend.add_bin([0.0, 0.0], [0.0, 0.0], [1, 1, 1])
    with pytest.raises(ValueError, match='window must be > 1'):
        trend.elasticities(1.0)


def test_elasticity_scores_move_only_on_evidence():
    uniform = np.full(4, 0.25)
    # equal elasticities at uniform weights, or differences within their errors: no move
    assert not elasticity_scores([0.3] * 4, [0.05] * 4, uniform, step_size=0.5, evidence_z=2.5).scores.any()
    assert not elasticity_scores([0.3, 0.35, 0.28, 0.31], [0.05] * 4, uniform, step_size=0.5,
                                 evidence_z=2.5).scores.any()
    # at the optimum w ~ e: no move, however precise
    optimum = np.array([0.4, 0.3, 0.2, 0.1])
    assert np.abs(elasticity_scores(optimum, [1e-9] * 4, optimum, step_size=0.5, evidence_z=2.5).scores).max() < 1e-6
    # precise: a domain with nothing to learn falls by step_size nats; one worth twice its share gains it
    result = elasticity_scores([0.0, 0.6, 0.3, 0.3], [1e-9] * 4, uniform, step_size=0.5, evidence_z=2.5)
    np.testing.assert_allclose(result.scores, [-0.5, 0.5 * (0.6 / (0.25 * 1.2) - 1), 0.0, 0.0], atol=1e-6)
    # Balanced loss weights scale the elasticities
    tilted = elasticity_scores([0.3, 0.3], [1e-9] * 2, [0.5, 0.5], step_size=1.0, evidence_z=0.0,
                               loss_weights=[1.5, 0.5])
    np.testing.assert_allclose(tilted.scores, [0.5, -0.5])
    # no update without evidence of anything to learn, or with missing fits; inactive domains are ignored
    assert 'not positive' in elasticity_scores([-0.1, 0.05], [0.01] * 2, [0.5, 0.5], step_size=0.5,
                                               evidence_z=2.5).reason
    assert 'non-finite elasticities for active domain(s) [0]' in elasticity_scores([np.nan, 0.2], [0.01] * 2, [0.5, 0.5], step_size=0.5,
                                                      evidence_z=2.5).reason
    assert elasticity_scores([np.nan, 0.2, 0.2], [1, 0.01, 0.01], [0.0, 0.5, 0.5], step_size=0.5, evidence_z=2.5,
                             active=[False, True, True]).reason == ''


def simulate(floors, scales, noise=None, *, checks=24, interval=50, batch=48, exponent=0.1, tau=0.0, seed=0):
    """Closed loop as in training: each check's batches follow the current weights, their per-sample losses
    follow each domain's power law L_k(n) = floor_k + scale_k n^-exponent (n its samples so far), and
    the weights take one step of the product's rule (defaults step_size 0.5, evidence_z 2.5, window 2;
    ``tau > 0``: Balanced, tilted by the latest bin's losses). Returns the weights after every check. The defaults give
    elasticities 0.2-0.3 nats per e-fold at a few thousand samples and a per-sample spread (``noise``) of
    0.5 nats, about what the six-domain benchmark logs."""
    rng = np.random.default_rng(seed)
    floors, scales = np.asarray(floors, float), np.asarray(scales, float)
    noise = np.full(floors.size, 0.5) if noise is None else np.asarray(noise, float)
    k = floors.size
    trend, log_weights = LossTrend(k), np.log(np.full(k, 1 / k))
    floor, history = default_min_weight(k, batch), []
    for _ in range(checks):
        counts = np.maximum(np.round(np.exp(log_weights) * batch * interval), interval).astype(int)
        add_power_law_bins(trend, rng, counts, floors, scales, exponent, noise, 1)
        elasticity, se, _ = trend.elasticities(2.0)
        tilt = balanced_coefficients(trend.latest_losses(), tau) if tau > 0 else None
        scores = elasticity_scores(elasticity, se, np.exp(log_weights), step_size=0.5, evidence_z=2.5,
                                   loss_weights=tilt)
        step = apply_scores(log_weights, scores.scores, min_weight=floor, reason=scores.reason)
        log_weights = step.log_weights
        history.append(step.weights)
    return np.array(history)


@pytest.mark.parametrize('seed', range(6))
def test_simulated_null_mixture_keeps_uniform_weights(seed):
    """Four identical domains (one corpus split at random): no weight leaves 1/K by more than 0.1 nats at
    any of 24 checks. Noise alone moves a fit by up to ~3 SE now and then; 2.5-SE shrinkage toward the
    mean keeps the target within a few percent of uniform."""
    history = simulate([2.0] * 4, [5.0] * 4, seed=seed)
    assert np.abs(np.log(4 * history)).max() < 0.1


@pytest.mark.parametrize('seed', range(6))
def test_simulated_planted_mixtures(seed):
    """A domain with nothing to learn sinks to the floor (random characters: every sample's loss is the
    alphabet's entropy, spread 0.05 nats; within 1.5x of the floor after 24 checks, from 12x); two copies of a domain end equal; the domain whose loss still
    falls fastest gains weight."""
    batch = 48
    floor = default_min_weight(4, batch)
    flat = simulate([4.0, 2.0, 2.0, 2.0], [0.0, 5.0, 5.0, 5.0], [0.05, 0.5, 0.5, 0.5], seed=seed)
    assert flat[-1][0] < 1.5 * floor and np.abs(np.log(3 * flat[-1][1:] / (1 - floor))).max() < 0.1
    copies = simulate([2.0, 2.0, 2.0], [5.0, 5.0, 2.0], seed=seed)
    assert abs(np.log(copies[-1][0] / copies[-1][1])) < 0.1 and copies[-1][2] < copies[-1][0]
    strong = simulate([2.0, 2.0, 2.0], [10.0, 5.0, 5.0], seed=seed)
    assert strong[-1][0] > 0.37 and abs(np.log(strong[-1][1] / strong[-1][2])) < 0.1


@pytest.mark.parametrize('seed', range(6))
def test_simulated_balanced_mixture_moves_toward_its_tilt(seed):
    """Two domains that learn alike, one 0.5 nats harder (a higher floor), and a copy of the easy one.
    Plain loss-slope keeps all three equal. Balanced with tau = 2 has its fixed point (w ~ y e,
    y ~ exp(tau L)) at log(w_hard / w_easy) ~ 0.9 (1.0 from the tilt, less the hard domain's smaller
    elasticity at more samples); it never moves the other way, and after 48 checks it is past 0.3
    (0.39-0.56 over 10 seeds: it moves only as far as the 2.5-SE threshold allows), below the fixed
    point, and the easy copies are within 0.25 nats of each other (at most 0.21 over 10 seeds)."""
    floors, scales = [2.5, 2.0, 2.0], [5.0, 5.0, 5.0]
    plain = simulate(floors, scales, seed=seed)[-1]
    assert np.abs(np.log(3 * plain)).max() < 0.1
    tilted = simulate(floors, scales, tau=2.0, checks=48, seed=seed)
    hard_over_easy = np.log(tilted[:, 0] / tilted[:, 1])
    assert hard_over_easy.min() >= 0 and 0.3 < hard_over_easy[-1] < 0.9
    assert np.abs(np.log(tilted[:, 1] / tilted[:, 2])).max() < 0.25


def test_per_sample_losses_match_cross_entropy_and_skip_ignored_labels():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[1, 3:] = -100
    losses = per_sample_losses(type('Out', (), {'logits': logits})(), {'labels': labels})
    for row in range(3):
        keep = labels[row, 1:] != -100
        expected = torch.nn.functional.cross_entropy(logits[row, :-1][keep], labels[row, 1:][keep])
        assert losses[row].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(per_sample_losses({'logits': logits}, {'labels': labels}), losses)
    with pytest.raises(TypeError, match='logits of shape'):
        per_sample_losses(torch.randn(3, 7), {'labels': labels})
    with pytest.raises(KeyError, match="batch\\['labels'\\]"):
        per_sample_losses(logits, {'input_ids': labels})


def test_a_batch_retried_after_an_oom_is_scored_once():
    """Composer fires BEFORE_TRAIN_BATCH again when automatic microbatching retries a batch after a CUDA OOM:
    the microbatches scored before the failure must not count twice in the step's sums."""
    from types import SimpleNamespace

    from composer.core import Event

    torch.manual_seed(0)
    algorithm = LossSlope(check_interval=100)
    algorithm.trend = LossTrend(2)
    algorithm._step = torch.zeros(3, 2, dtype=torch.float64)
    algorithm._interval = torch.zeros_like(algorithm._step)
    microbatch = {'labels': torch.randint(0, 7, (4, 5)), 'domain': torch.tensor([0, 0, 1, 1])}
    state = SimpleNamespace(outputs=torch.randn(4, 5, 7), batch=microbatch,
                            timestamp=SimpleNamespace(batch=1))
    algorithm.apply(Event.BEFORE_TRAIN_BATCH, state, None)
    algorithm.apply(Event.AFTER_LOSS, state, None)  # then the batch fails with a CUDA OOM and is retried
    assert algorithm.match(Event.BEFORE_TRAIN_BATCH, state)
    algorithm.apply(Event.BEFORE_TRAIN_BATCH, state, None)
    algorithm.apply(Event.AFTER_LOSS, state, None)
    algorithm.apply(Event.BATCH_END, state, None)
    losses = per_sample_losses(state.outputs, microbatch).double()
    torch.testing.assert_close(algorithm._interval[2], torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(algorithm._interval[0], torch.stack([losses[:2].sum(), losses[2:].sum()]))


@pytest.mark.parametrize('option, value, message', [
    ('check_interval', 0, 'check_interval must be >= 1'), ('window', 1.0, 'window must be > 1'),
    ('step_size', 0.0, 'step_size must be > 0'),
    ('evidence_z', -1.0, 'evidence_z must be >= 0'), ('score_clip', 0.0, 'score_clip must be > 0'),
    ('tau', -1.0, 'tau must be >= 0'), ('max_epochs_per_domain', 0.0, 'max_epochs_per_domain must be > 0')])
def test_options_are_checked(option, value, message):
    with pytest.raises(ValueError, match=message):
        LossSlope(**{option: value})
