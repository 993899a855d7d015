"""Mixing headroom: which domains deserve samples, and a first-order estimate of what a static mixture gains.

Reads a benchmarks/mixing_quality.py output directory (``OUT/runs/<policy>/seed<s>/metrics.jsonl``)
and pairs every non-Mix run with the Mix run of the same seed. For each domain k it has the final
held-out loss L_k (nats per token) and the samples trained on k, n_k (``mixture/epochs/<k>`` times
the domain's training samples). Fitted per domain over the pairs:

    L_k - L_k(Mix) = a_k - e_k * log(n_k / n_k(Mix))        (least squares, e_k +- its standard error)

e_k is the domain's elasticity: nats of held-out loss gained per nat of its own samples; a_k absorbs
what the other domains' reallocation does to k (transfer). Under this model a static mixture w changes
the average loss by -(1/K) sum_k e_k log(w_k / u_k) (u: Mix's weights), so the best one is
w* = e / sum(e), and scaling every domain's samples by c changes it by -(mean e) log c. Hence

    best_static_avg_gain      = (1/K) sum_k e_k log(w*_k / u_k)          nats, lower average loss than Mix
    best_static_compute_ratio = exp(-KL(w* || u))                         compute at which w* reaches Mix's
                                                                          final average loss / Mix's compute

Mixing can only buy compute where the domains' elasticities differ: the ratio is 1 when they are
equal. The model is first order (linear in log n over the reallocations the runs made) and leaves
transfer between domains to the intercepts, so its ratio is an estimate, not a bound: on the benchmark
corpus it pointed at the right domains but undercounted what favouring a broad one gives the others
(README, "What any mixture can gain"). It is checked by predicting each run's change of average loss
from its own allocation (``model_check``). Intervals: the pairs are resampled with replacement
(numpy default_rng(20250206)) and everything refitted.

    .venv/bin/python benchmarks/mixing_headroom.py runs/mixing_quality   # after mixing_quality.py --quick

Then train w* to test the prediction:
    .venv/bin/python benchmarks/mixing_quality.py --quick --policies fixed --fixed-weights W1 ... WK --reuse mix

The last stdout line is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
BOOTSTRAP_SEED = 20250206


@dataclass(frozen=True)
class Pairs:
    """Per (policy, seed) pair against Mix: rows of final-loss and log-sample changes, one column a domain."""
    labels: list[str]
    loss_change: np.ndarray  # (P, K) nats per token
    log_sample_ratio: np.ndarray  # (P, K) log(n_k / n_k(Mix))
    reference_weights: np.ndarray  # (K,) Mix's share of the samples


def fit_elasticities(loss_change: np.ndarray, log_sample_ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain least-squares fit (with an intercept) of ``loss_change`` on ``log_sample_ratio``:
    returns (elasticity e = -slope, its standard error); NaN where a domain's allocation never varied."""
    x, y = np.asarray(log_sample_ratio, dtype=np.float64), np.asarray(loss_change, dtype=np.float64)
    centred = x - x.mean(axis=0)
    spread = np.sum(centred**2, axis=0)
    with np.errstate(divide='ignore', invalid='ignore'):
        slope = np.sum(centred * (y - y.mean(axis=0)), axis=0) / spread
        residual = y - y.mean(axis=0) - slope * centred
        dof = max(x.shape[0] - 2, 1)
        se = np.sqrt(np.sum(residual**2, axis=0) / dof / spread)
    return -slope, se


def best_static_mixture(elasticity: np.ndarray, reference_weights: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The static mixture that minimises the model's average loss: ``w* = e / sum(e)`` (negative e
    count as 0), its average-loss gain over the reference in nats, and its compute ratio
    ``exp(-KL(w* || reference))`` (see the module docstring)."""
    e = np.maximum(np.asarray(elasticity, dtype=np.float64), 0.0)
    reference = np.asarray(reference_weights, dtype=np.float64)
    if not (np.all(np.isfinite(e)) and e.sum() > 0):
        raise ValueError(f'elasticities must be finite with a positive sum, got {elasticity!r}')
    weights = e / e.sum()
    with np.errstate(divide='ignore', invalid='ignore'):
        log_ratio = np.where(weights > 0, np.log(weights / reference), 0.0)
    gain = float(np.sum(e * log_ratio) / e.size)
    return weights, gain, float(np.exp(-np.sum(weights * log_ratio)))


def read_pairs(out_dir: str) -> tuple[Pairs, list[str]]:
    """Final per-domain losses and sample counts of every run in ``out_dir``, paired by seed with Mix."""
    from composer_pike.demo import read_metrics

    with open(os.path.join(out_dir, 'results.json')) as f:
        data = json.load(f)['data']
    with open(data if data.endswith('.json') else os.path.join(data, 'manifest.json')) as f:
        manifest = json.load(f)['domains']
    domains = list(manifest)
    train_samples = np.array([manifest[d]['splits']['train']['samples'] for d in domains], dtype=np.float64)

    def final(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
        series = read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
        try:
            loss = [series[f'metrics/val_{d}/LanguageCrossEntropy'][-1][1] for d in domains]
            epochs = [series[f'mixture/epochs/{d}'][-1][1] for d in domains]
        except KeyError as missing:
            raise SystemExit(f'{run_dir}: metric {missing} was not logged') from None
        return np.array(loss), np.array(epochs) * train_samples

    runs_dir = os.path.join(out_dir, 'runs')
    mix_seeds = sorted(os.listdir(os.path.join(runs_dir, 'mix')))
    mix = {seed: final(os.path.join(runs_dir, 'mix', seed)) for seed in mix_seeds}
    labels, loss_change, log_ratio = [], [], []
    for policy in sorted(os.listdir(runs_dir)):
        if policy == 'mix':
            continue
        for seed in sorted(os.listdir(os.path.join(runs_dir, policy))):
            if seed not in mix:
                continue
            loss, samples = final(os.path.join(runs_dir, policy, seed))
            labels.append(f'{policy}/{seed}')
            loss_change.append(loss - mix[seed][0])
            log_ratio.append(np.log(samples / mix[seed][1]))
    if len(labels) < 3:
        raise SystemExit(f'{out_dir}: need at least 3 runs paired with a Mix seed, found {len(labels)}')
    reference = np.mean([samples / samples.sum() for _, samples in mix.values()], axis=0)
    return Pairs(labels, np.array(loss_change), np.array(log_ratio), reference), domains


def summarize(pairs: Pairs, domains: list[str]) -> dict:
    elasticity, se = fit_elasticities(pairs.loss_change, pairs.log_sample_ratio)
    weights, gain, ratio = best_static_mixture(elasticity, pairs.reference_weights)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    resampled = []
    for _ in range(RESAMPLES):
        rows = rng.integers(0, len(pairs.labels), len(pairs.labels))
        e, _ = fit_elasticities(pairs.loss_change[rows], pairs.log_sample_ratio[rows])
        if np.all(np.isfinite(e)) and np.maximum(e, 0).sum() > 0:
            resampled.append(best_static_mixture(e, pairs.reference_weights)[1:])
    gains, ratios = np.array(resampled).T
    predicted = -(pairs.log_sample_ratio * elasticity).mean(axis=1)  # the intercepts are not a mixture's doing
    return {
        'domains': domains, 'runs': len(pairs.labels),
        'elasticity': dict(zip(domains, elasticity.round(4).tolist())),
        'elasticity_se': dict(zip(domains, se.round(4).tolist())),
        'best_static_weights': dict(zip(domains, weights.round(4).tolist())),
        'best_static_avg_gain': round(gain, 5),
        'best_static_avg_gain_ci': np.quantile(gains, [0.025, 0.975]).round(5).tolist(),
        'best_static_compute_ratio': round(ratio, 4),
        'best_static_compute_ratio_ci': np.quantile(ratios, [0.025, 0.975]).round(4).tolist(),
        'model_check': {label: {'avg_loss_change': round(float(change.mean()), 4), 'predicted': round(float(p), 4)}
                        for label, change, p in zip(pairs.labels, pairs.loss_change, predicted)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out', help='a benchmarks/mixing_quality.py --out directory with Mix and other policies')
    args = parser.parse_args(argv)
    summary = summarize(*read_pairs(args.out))
    for domain in summary['domains']:
        print(f"{domain:>16}  elasticity {summary['elasticity'][domain]:+.3f} +- {summary['elasticity_se'][domain]:.3f}"
              f"  best static weight {summary['best_static_weights'][domain]:.3f}")
    print(f"best static mixture: average loss {summary['best_static_avg_gain']:.4f} nats below Mix "
          f"{summary['best_static_avg_gain_ci']}, compute ratio {summary['best_static_compute_ratio']:.3f} "
          f"{summary['best_static_compute_ratio_ci']} ({summary['runs']} runs paired with Mix)")
    for label, check in summary['model_check'].items():
        print(f"{label:>28}  avg loss change {check['avg_loss_change']:+.4f}, model {check['predicted']:+.4f}")
    print(json.dumps(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
