"""The pure parts of benchmarks/mixing_quality.py: crossings, compute accounting, paired bootstrap (no training)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmark_modules import load_benchmark

mq = load_benchmark('mixing_quality')


def series(avg: list[tuple[int, float]], worst: list[tuple[int, float]] | None = None, **extra) -> dict:
    out = {mq.AVG: list(avg), mq.WORST: list(worst or [(s, v + 0.3) for s, v in avg])}
    out.update(extra)
    return out


# ------------------------------------------------------------------------------------------ crossing


def test_steps_to_reach_interpolates_linearly_between_evaluations():
    steps, values = np.array([100, 200, 300]), np.array([3.0, 2.0, 1.5])
    assert mq.steps_to_reach(steps, values, 2.5) == pytest.approx(150.0)
    assert mq.steps_to_reach(steps, values, 1.75) == pytest.approx(250.0)
    assert mq.steps_to_reach(steps, values, 2.0) == pytest.approx(200.0)   # exactly at an evaluation
    assert mq.steps_to_reach(steps, values, 3.5) == 100.0                  # already there at the first one
    assert mq.steps_to_reach(steps, values, 1.4) is None                   # never


def test_steps_to_reach_takes_the_first_crossing_of_a_noisy_curve():
    steps, values = np.array([50, 100, 150, 200]), np.array([3.0, 2.4, 2.6, 2.2])
    assert mq.steps_to_reach(steps, values, 2.5) == pytest.approx(50 + 0.5 / 0.6 * 50)


def test_value_at_is_linear_and_nan_outside():
    steps, values = np.array([100, 200]), np.array([3.0, 2.0])
    assert mq.value_at(steps, values, 125) == pytest.approx(2.75)
    assert math.isnan(mq.value_at(steps, values, 50))
    assert math.isnan(mq.value_at(steps, values, 250))


# ---------------------------------------------------------------------------------- compute accounting


def test_fallback_probe_curve_counts_checks_before_each_step():
    steps, cumulative = mq.fallback_probe_curve(600, 50, 2, 24)
    assert steps.tolist() == list(range(1, 600, 50))             # probe before step b + 1, b = 0, 50, ..., 550
    assert cumulative.tolist() == [48.0 * k for k in range(1, 13)]
    assert cumulative[-1] / (600 * 48) == pytest.approx(0.02)     # the quick setting's probe budget
    with pytest.raises(ValueError):
        mq.fallback_probe_curve(600, 0, 2, 24)


def test_probe_samples_at_counts_a_probe_from_inside_its_step_on():
    probe = (np.array([1, 51, 101]), np.array([48.0, 96.0, 144.0]))
    assert mq.probe_samples_at(probe, 0) == 0.0
    assert mq.probe_samples_at(probe, 0.5) == 48.0
    assert mq.probe_samples_at(probe, 1) == 48.0
    assert mq.probe_samples_at(probe, 50) == 48.0
    assert mq.probe_samples_at(probe, 50.0000000001) == 48.0      # float noise of an interpolated step
    assert mq.probe_samples_at(probe, 50.2) == 96.0
    assert mq.probe_samples_at(probe, 1000) == 144.0
    assert mq.probe_samples_at(None, 300) == 0.0


def test_compute_at_is_steps_times_batch_plus_probe():
    probe = mq.fallback_probe_curve(600, 50, 2, 24)
    assert mq.compute_at(600, 48, probe) == 600 * 48 + 576
    assert mq.compute_at(450, 48, probe) == 450 * 48 + 9 * 48      # probes before steps 1, 51, ..., 401
    assert mq.compute_at(450, 48, None) == 450 * 48


def test_step_at_compute_inverts_compute():
    probe = mq.fallback_probe_curve(600, 50, 2, 24)
    step = mq.step_at_compute(600 * 48, 48, probe, 600)
    assert step == pytest.approx(588.0, abs=1e-6)                  # 588 x 48 + 576 = 600 x 48
    assert mq.compute_at(step, 48, probe) <= 600 * 48
    assert mq.step_at_compute(600 * 48, 48, None, 600) == 600.0


def test_probe_for_prefers_the_logged_metric_and_falls_back_to_the_config():
    logged = series([(600, 2.0)], **{mq.PROBE: [(1, 48.0), (51, 96.0)]})
    probe, source = mq.probe_for(logged, True, 600, None, 6)
    assert source == 'logged' and probe[1].tolist() == [48.0, 96.0]
    sizes = {'check_interval': 25, 'estimation_batch_size': 32, 'domains_per_check': None}
    probe, source = mq.probe_for(series([(200, 2.0)]), True, 200, sizes, 6)
    assert source == 'config'
    assert probe[1][-1] == 8 * 6 * 32                              # the old quick setting: 16% of 200 x 48
    assert probe[1][-1] / (200 * 48) == pytest.approx(0.16)
    probe, _ = mq.probe_for(series([(200, 2.0)]), True, 200, {**sizes, 'domains_per_check': 2}, 6)
    assert probe[1][-1] == 8 * 2 * 32
    assert mq.probe_for(series([(200, 2.0)]), False, 200, None, 6) == (None, 'none')
    with pytest.raises(ValueError):
        mq.probe_for(series([(200, 2.0)]), True, 200, None, 6)


# -------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = [0.81, 0.86, 0.79, 0.9, 0.84]
    first = mq.bootstrap_mean_ci(values)
    assert first == mq.bootstrap_mean_ci(list(values))
    assert first[0] <= np.mean(values) <= first[1]
    assert min(values) <= first[0] and first[1] <= max(values)
    assert first == (pytest.approx(0.808), pytest.approx(0.874))     # pinned: fixed seed, 10000 resamples
    assert mq.bootstrap_mean_ci(values, resamples=7, seed=3) == mq.bootstrap_mean_ci(values, resamples=7, seed=3)
    assert mq.bootstrap_mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert mq.bootstrap_mean_ci([]) == (None, None)
    with pytest.raises(ValueError):
        mq.bootstrap_mean_ci([1.0, math.nan])


def test_bootstrap_with_a_seed_that_never_reached_is_unbounded_above():
    low, high = mq.bootstrap_mean_ci([0.8, 0.82, 0.85, 0.9, math.inf])
    assert high is None
    assert low is not None and 0.8 <= low < 1.0    # most resamples of 5 hold the inf at least once, not all
    assert mq.bootstrap_mean_ci([math.inf, math.inf]) == (None, None)
    assert mq.finite_mean([0.8, math.inf]) is None
    assert mq.finite_mean([0.8, 0.9]) == pytest.approx(0.85)


# ------------------------------------------------------------------------------------- paired summary


def _runs():
    evals = [100, 200, 300, 400, 500, 600]
    probe = mq.fallback_probe_curve(600, 50, 2, 24)
    mix = [mq.Run(series([(s, 3.0 - s / 600 * (1.0 + 0.1 * seed)) for s in evals]), 48, None, 'none', 0.1)
           for seed in range(3)]
    # pike reaches each Mix seed's final loss at step 450 exactly, then goes 0.05 lower
    pike = []
    for seed, ref in enumerate(mix):
        target = ref.final(mq.AVG)
        values = [(s, target + (450 - s) / 450 * 0.5) if s <= 450 else (s, target - 0.05 * (s - 450) / 150)
                  for s in [100, 200, 300, 400, 450, 500, 600]]
        pike.append(mq.Run(series(values, [(s, v + 0.2) for s, v in values],
                                  **{'pike/weight/a': [(1, 0.5)], 'pike/score/a': [(1, 0.1)]}),
                           48, probe, 'config', 0.11))
    never = [mq.Run(series([(s, 3.1 - s / 600 * 0.9) for s in evals]), 48, None, 'none', 0.1) for _ in range(3)]
    return {'mix': mix, 'pike': pike, 'temperature': never}


def test_paired_compute_ratio_counts_the_probe():
    pairs = mq.paired(_runs())
    expected = (450 * 48 + 9 * 48) / (600 * 48)
    for row in pairs['pike']:
        assert row['steps_to_mix_final'] == pytest.approx(450.0)
        assert row['compute_ratio'] == pytest.approx(expected)
        assert row['probe_fraction'] == pytest.approx(0.02)
        assert row['avg_loss_diff'] == pytest.approx(-0.05)
    for row in pairs['mix']:
        assert row['compute_ratio'] == pytest.approx(1.0)
        assert row['avg_loss_diff'] == 0.0
    assert all(row['compute_ratio'] == math.inf for row in pairs['temperature'])


def test_summary_keys_and_nulls():
    summary = mq._json_safe(mq.summarize(_runs()))
    expected = (450 * 48 + 9 * 48) / (600 * 48)
    assert summary['pike_compute_to_mix_final'] == pytest.approx(expected)
    assert summary['pike_compute_to_mix_final_ci'] == [pytest.approx(expected), pytest.approx(expected)]
    assert summary['pike_steps_to_mix_final'] == pytest.approx(0.75)
    for key in ('balanced_worst_vs_mix', 'balanced_avg_vs_mix', 'loss_slope_compute_to_mix_final',
                'balanced_loss_slope_worst_vs_mix', 'balanced_loss_slope_avg_vs_mix'):
        assert key in summary and summary[key] is None             # no balanced or loss-slope runs here
    temperature = summary['policies']['temperature']
    assert temperature['compute_to_mix_final'] is None and temperature['compute_to_mix_final_ci'] == [None, None]
    pike = summary['policies']['pike']
    for key in ('compute_to_mix_final', 'compute_to_mix_final_ci', 'avg_loss_diff_ci', 'worst_loss_diff_ci',
                'probe_fraction'):
        assert key in pike
    assert pike['probe_fraction'] == pytest.approx(0.02)
    json.dumps(summary, allow_nan=False)                              # strict JSON: no Infinity or NaN


def test_markdown_skips_missing_pike_statistics():
    runs = _runs()
    summary = mq._json_safe(mq.summarize(runs))
    text = mq.results_markdown(summary, runs, [0, 1, 2], ['a', 'b'], 'test')
    assert '| pike | 0 |' in text and 'never' in text
    assert 'score' in text and 'noise_scale' not in text
    assert 'were computed from the config' in text


@pytest.mark.parametrize('arguments, message', [
    (['--policies', 'fixed'], "--fixed-weights goes with --policies fixed"),
    (['--policies', 'pike', '--fixed-weights', '0.5', '0.5'], "--fixed-weights goes with --policies fixed"),
    (['--policies', 'fixed', '--fixed-weights', '1'], "--fixed-weights has 1 values for 2 domains"),
])
def test_fixed_weights_are_checked_before_anything_trains(tmp_path, capsys, arguments, message):
    (tmp_path / 'manifest.json').write_text(json.dumps({'domains': {'a': {}, 'b': {}}}))
    with pytest.raises(SystemExit) as exit_info:
        mq.main(['--data', str(tmp_path), '--out', str(tmp_path / 'out'), *arguments])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
