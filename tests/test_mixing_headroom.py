"""benchmarks/mixing_headroom.py: the elasticity fit, the best static mixture and the CLI on fabricated runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmark_modules import load_benchmark

headroom = load_benchmark('mixing_headroom')

DOMAINS = ['a', 'b', 'c']
ELASTICITY = np.array([0.3, 0.15, 0.15])


def model_gain(elasticity: np.ndarray, weights: np.ndarray, reference: np.ndarray) -> float:
    """The model's lowering of the average loss by a static mixture (module docstring)."""
    return float(np.sum(elasticity * np.log(weights / reference)) / elasticity.size)


def test_the_fit_recovers_the_elasticities_and_ignores_the_transfer_intercept():
    rng = np.random.default_rng(0)
    log_ratio = rng.normal(0.0, 0.5, size=(12, 3))
    loss_change = np.array([0.02, -0.01, 0.0]) - ELASTICITY * log_ratio
    elasticity, se = headroom.fit_elasticities(loss_change, log_ratio)
    np.testing.assert_allclose(elasticity, ELASTICITY, atol=1e-12)
    np.testing.assert_allclose(se, 0.0, atol=1e-12)
    noisy, noisy_se = headroom.fit_elasticities(loss_change + rng.normal(0.0, 0.01, size=(12, 3)), log_ratio)
    assert np.all(np.abs(noisy - ELASTICITY) < 4 * noisy_se) and np.all(noisy_se > 0)


def test_the_best_static_mixture_is_proportional_to_the_elasticities_and_beats_every_other():
    uniform = np.full(3, 1 / 3)
    weights, gain, ratio = headroom.best_static_mixture(ELASTICITY, uniform)
    np.testing.assert_allclose(weights, [0.5, 0.25, 0.25])
    assert gain == pytest.approx(model_gain(ELASTICITY, weights, uniform))
    for other in np.random.default_rng(1).dirichlet(np.ones(3), size=500):
        assert model_gain(ELASTICITY, other, uniform) <= gain + 1e-12
    # at compute ratio c, w* reaches the reference's loss: gain + mean(e) log c = 0
    assert gain + ELASTICITY.mean() * np.log(ratio) == pytest.approx(0.0, abs=1e-12)
    assert ratio == pytest.approx(np.exp(-np.sum(weights * np.log(weights / uniform))))


def test_equal_elasticities_leave_nothing_to_gain():
    reference = np.array([0.5, 0.3, 0.2])
    weights, gain, ratio = headroom.best_static_mixture(np.full(3, 0.2), np.full(3, 1 / 3))
    np.testing.assert_allclose(weights, 1 / 3)
    assert gain == pytest.approx(0.0, abs=1e-15) and ratio == pytest.approx(1.0)
    _, gain, ratio = headroom.best_static_mixture(0.2 * reference, reference)
    assert gain == pytest.approx(0.0, abs=1e-15) and ratio == pytest.approx(1.0)
    with pytest.raises(ValueError, match='elasticities'):
        headroom.best_static_mixture(np.array([np.nan, 0.1, 0.1]), np.full(3, 1 / 3))


def write_run(path: str, losses: np.ndarray, epochs: np.ndarray) -> None:
    os.makedirs(path)
    with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
        for step in (300, 600):
            record = {'step': step}
            record.update({f'metrics/val_{d}/LanguageCrossEntropy': float(v) for d, v in zip(DOMAINS, losses)})
            record.update({f'mixture/epochs/{d}': float(v) * step / 600 for d, v in zip(DOMAINS, epochs)})
            f.write(json.dumps(record) + '\n')


def test_the_cli_pairs_runs_by_seed_and_reports_the_model(tmp_path, capsys):
    """Fabricated runs that follow the model exactly: the CLI recovers e, w* and a tight interval."""
    sizes = np.array([1000.0, 500.0, 2000.0])
    manifest = {'domains': {d: {'splits': {'train': {'samples': int(n)}}} for d, n in zip(DOMAINS, sizes)}}
    (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
    (tmp_path / 'results.json').write_text(json.dumps({'data': str(tmp_path)}))
    mix_samples = np.full(3, 400.0)
    rng = np.random.default_rng(2)
    for seed in range(3):
        base = np.array([2.0, 1.8, 1.5]) + 0.01 * seed
        write_run(str(tmp_path / 'runs' / 'mix' / f'seed{seed}'), base, mix_samples / sizes)
        for policy in ('pike', 'other'):
            samples = mix_samples * np.exp(rng.normal(0.0, 0.4, size=3))
            losses = base + 0.005 - ELASTICITY * np.log(samples / mix_samples)
            write_run(str(tmp_path / 'runs' / policy / f'seed{seed}'), losses, samples / sizes)
    write_run(str(tmp_path / 'runs' / 'pike' / 'seed9'), np.zeros(3), np.ones(3))  # no Mix seed 9: ignored

    assert headroom.main([str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary['runs'] == 6
    np.testing.assert_allclose(list(summary['elasticity'].values()), ELASTICITY, atol=1e-4)
    np.testing.assert_allclose(list(summary['best_static_weights'].values()), [0.5, 0.25, 0.25], atol=1e-4)
    _, gain, ratio = headroom.best_static_mixture(ELASTICITY, np.full(3, 1 / 3))
    assert summary['best_static_avg_gain'] == pytest.approx(gain, abs=1e-5)
    assert summary['best_static_compute_ratio_ci'][0] <= ratio <= summary['best_static_compute_ratio_ci'][1] + 1e-4
    check = summary['model_check']['pike/seed0']
    assert check['avg_loss_change'] == pytest.approx(check['predicted'] + 0.005, abs=1e-4)
