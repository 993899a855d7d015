"""Mixing quality: PiKE and Balanced-PiKE against the paper's baselines on the same shards.

Every policy trains the same model from the same YAML for the same number of steps with the same
global batch and sequence length (so the same number of training tokens), once per seed:

    mix                  uniform weights, every batch mixes all domains
    random               uniform weights, each whole batch from one domain drawn at random
    round_robin          whole batches from each domain in turn
    temperature          w_k ~ n_k^(1/3) (n_k = training samples of domain k), fixed
    pike                 PiKE (adaptive, tau = 0)
    balanced_pike_tau1   Balanced-PiKE, tau = 1
    balanced_pike_tau3   Balanced-PiKE, tau = 3 (the paper's value)

Data: the public six-domain corpus of ``streaming_prep.corpora`` (prepared once into
``<cache>/prepared/...``), or any pike-prep manifest with ``--data``. Each run is
``python -m composer_pike.train CONFIG`` in a subprocess (``composer_pike.demo.run_training``);
its metrics and timestamped console log land in ``OUT/runs/<policy>/seed<s>/``.

Definitions (losses are held-out cross-entropy in nats per token on each domain's val split, as
the training entry point evaluates it; "final" is the evaluation after the last step):

    avg_loss           mean over seeds of the final average over domains (``eval/avg_loss``)
    worst_loss         mean over seeds of the final worst domain (``eval/worst_loss``)
    steps_to_mix_final the first step at which the policy's seed-mean ``eval/avg_loss`` curve reaches
                       Mix's avg_loss, linearly interpolated between evaluations; null if it never does
    s_per_step         mean over seeds of wall seconds per training step, PiKE's gradient probes
                       included, evaluation excluded (measured from console line arrival times)
    pike_steps_to_mix_final  x = steps_to_mix_final of pike / the number of training steps (Mix's steps)
    balanced_worst_vs_mix    y = worst_loss of balanced_pike_tau3 / worst_loss of mix
    balanced_avg_vs_mix      avg_loss of balanced_pike_tau3 / avg_loss of mix

The issue's goals are x <= 0.85, y < 1 and balanced_avg_vs_mix <= 1.01; the benchmark reports
whatever the runs give. ``results.md`` adds each seed's final loss, the paired steps to Mix's final
loss (seed s of a policy against seed s of Mix: one slow Mix seed moves the seed-mean target for
every policy), per-domain losses, final weights and PiKE's logged statistics (gradient noise scale
sigma^2/G per domain, pairwise gradient cosines).

Outputs in ``--out``: results.md, results.json, results.png (average and worst-domain loss
curves, steps to Mix's final loss, seconds per step) and pike_stats.png (PiKE weights, noise
scales and minimum cosine). The last stdout line is the JSON summary
``{"policies": {name: {avg_loss, worst_loss, steps_to_mix_final, s_per_step}},
"pike_steps_to_mix_final": x, "balanced_worst_vs_mix": y, "balanced_avg_vs_mix": z}``.

    python benchmarks/mixing_quality.py --quick                 # 25 min measured on a loaded 2-core machine
    python benchmarks/mixing_quality.py                         # the full run (hours on CPU)
    python benchmarks/mixing_quality.py --data DIR/manifest.json --quick
    python benchmarks/mixing_quality.py --quick --seeds 0 1 2 -- optimizer.lr=1e-3
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from composer_pike.demo import read_metrics, run_training

POLICIES: dict[str, list[str]] = {
    'mix': ['mixing.policy=mix'],
    'random': ['mixing.policy=random'],
    'round_robin': ['mixing.policy=round_robin'],
    'temperature': ['mixing.policy=temperature', 'mixing.temperature=3'],
    'pike': ['mixing.policy=pike'],
    'balanced_pike_tau1': ['mixing.policy=balanced_pike', 'mixing.tau=1'],
    'balanced_pike_tau3': ['mixing.policy=balanced_pike', 'mixing.tau=3'],
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVG, WORST = 'eval/avg_loss', 'eval/worst_loss'
STEP_LINE = re.compile(r'\[batch=(\d+)/\d+\]')
EVAL_LINE = re.compile(r'\[Eval batch=|Eval metrics/')


@dataclass(frozen=True)
class Setting:
    """One benchmark size: steps per run, seeds, the corpus's seq_len, and overrides for every run."""
    steps: int
    seeds: tuple[int, ...]
    seq_len: int
    overrides: tuple[str, ...]


# quick: 14 runs of a 0.46M-parameter byte-level GPT-2 (the demo's model); per run about 10 s of
# start-up, 200 steps of 48 x 64 tokens, 5 evaluations of 128 sequences per domain and (PiKE)
# 8 probes of 32 sequences per domain. full: sequences of 128, batches of 64, 1500 steps, 3 seeds
# (hours on CPU). The batch is large enough for the weights to matter: a domain's share of a batch
# is an integer, so with K = 6 domains and 16 samples, weights from 0.15 to 0.19 all give 2 or 3.
# weight_decay: Composer's DecoupledAdamW multiplies the weights by (1 - weight_decay * lr / peak lr)
# every step, so 2e-4 here is torch AdamW's 0.1 at lr 2e-3 (0.1 here would shrink the weights by 10%
# a step and the model collapses to near-uniform predictions within ~50 steps).
COMMON = ('model.d_model=128', 'model.n_layers=2', 'model.n_heads=4', 'optimizer.lr=2.0e-3',
          'optimizer.weight_decay=2.0e-4', 'data.eval_batch_size=32', 'mixing.pike.estimation_batch_size=32',
          'mixing.pike.num_chunks=8')
QUICK = Setting(steps=200, seeds=(0, 1), seq_len=64, overrides=(
    *COMMON, 'data.global_batch_size=48', 'data.eval_max_batches=4', 'optimizer.warmup=20ba',
    'trainer.eval_interval=40ba', 'mixing.pike.check_interval=25'))
FULL = Setting(steps=1500, seeds=(0, 1, 2), seq_len=128, overrides=(
    *COMMON, 'data.global_batch_size=64', 'data.eval_max_batches=8', 'optimizer.warmup=50ba',
    'trainer.eval_interval=100ba', 'mixing.pike.check_interval=50'))


# ---------------------------------------------------------------------------------------------- math


def curve(series: Mapping[str, list[tuple[int, float]]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A logged metric as (steps, values) arrays; KeyError naming the metric when it was never logged."""
    if name not in series:
        raise KeyError(f'metric {name} was not logged')
    steps, values = zip(*series[name])
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def mean_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise mean over seeds of curves evaluated at the same steps."""
    steps = curves[0][0]
    for other, _ in curves[1:]:
        if not np.array_equal(other, steps):
            raise ValueError(f'seeds were evaluated at different steps: {steps.tolist()} vs {other.tolist()}')
    return steps, np.mean([values for _, values in curves], axis=0)


def steps_to_reach(steps: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """First step at which a loss curve reaches ``target``, linear between evaluations; None if never."""
    below = np.flatnonzero(values <= target)
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (v0 - target) / (v0 - v1) * (s1 - s0))


def step_seconds(lines: Sequence[tuple[float, str]]) -> float:
    """Mean wall seconds per training step from timestamped console lines.

    Composer prints ``[batch=N/M]`` when step N ends. A step starts when the previous one ended or,
    when an evaluation ran in between, when the last evaluation line was printed, so evaluation
    time is left out and every step after the first (PiKE's probe steps included) is counted.
    """
    total, steps = 0.0, 0
    last_step, start = None, None
    for seconds, line in lines:
        if EVAL_LINE.search(line):
            if start is not None:
                start = seconds
            continue
        match = STEP_LINE.search(line)
        if match is None:
            continue
        step = int(match[1])
        if last_step is not None and step > last_step:
            total += seconds - start
            steps += step - last_step
        last_step = step if last_step is None else max(step, last_step)
        start = seconds  # a step printed again after evaluation restarts the clock too
    if steps == 0:
        raise ValueError('no two training steps found in the console log')
    return total / steps


def summarize(runs: Mapping[str, Sequence[Mapping[str, list[tuple[int, float]]]]],
              seconds: Mapping[str, Sequence[float]], total_steps: int) -> dict:
    """The summary of every policy over its seeds, plus the issue's three ratios (see module docstring)."""
    policies: dict[str, dict] = {}
    mean_curves = {}
    for name, seeds in runs.items():
        avg = [curve(series, AVG) for series in seeds]
        worst = [curve(series, WORST) for series in seeds]
        mean_curves[name] = mean_curve(avg)
        policies[name] = {
            'avg_loss': float(np.mean([values[-1] for _, values in avg])),
            'worst_loss': float(np.mean([values[-1] for _, values in worst])),
            'steps_to_mix_final': None,
            's_per_step': float(np.mean(seconds[name])),
        }
    if 'mix' in policies:
        target = policies['mix']['avg_loss']
        for name, (steps, values) in mean_curves.items():
            policies[name]['steps_to_mix_final'] = steps_to_reach(steps, values, target)

    def ratio(top: float | None, bottom: float | None) -> float | None:
        return None if top is None or bottom is None else top / bottom

    pike, mix, balanced = (policies.get(n, {}) for n in ('pike', 'mix', 'balanced_pike_tau3'))
    return {
        'policies': policies,
        'pike_steps_to_mix_final': ratio(pike.get('steps_to_mix_final'), total_steps if mix else None),
        'balanced_worst_vs_mix': ratio(balanced.get('worst_loss'), mix.get('worst_loss')),
        'balanced_avg_vs_mix': ratio(balanced.get('avg_loss'), mix.get('avg_loss')),
    }


def paired_steps_to_mix_final(runs: Mapping[str, Sequence[Mapping[str, list[tuple[int, float]]]]]) -> dict:
    """Per seed s: the step at which a policy's seed-s avg-loss curve reaches Mix's seed-s final loss (or None).

    A check on the seed-mean figure: one slow or fast seed of Mix moves the mean target for every policy.
    """
    targets = final_values(runs['mix'], AVG)
    return {name: [steps_to_reach(*curve(series, AVG), target) for series, target in zip(seeds, targets)]
            for name, seeds in runs.items()}


def final_values(seeds: Sequence[Mapping[str, list[tuple[int, float]]]], name: str) -> list[float]:
    """The last logged value of a metric in each seed's run."""
    return [series[name][-1][1] for series in seeds]


# ------------------------------------------------------------------------------------------- report


def results_markdown(summary: dict, runs: Mapping[str, Sequence[Mapping]], domains: Sequence[str],
                     total_steps: int, setting: str) -> str:
    """The results table, per-domain losses, and PiKE's logged statistics, as markdown."""
    lines = [f'Setting: {setting}', '',
             '| policy | avg loss | worst loss | avg (per seed) | steps to Mix final | same, per seed (paired) '
             '| s/step |', '|---|---|---|---|---|---|---|']
    paired = paired_steps_to_mix_final(runs) if 'mix' in runs else {}
    for name, row in summary['policies'].items():
        reached = row['steps_to_mix_final']
        reached_text = 'not reached' if reached is None else f'{reached:.0f} ({reached / total_steps:.2f}x)'
        per_seed = ' '.join(f'{v:.4f}' for v in final_values(runs[name], AVG))
        per_seed_reached = ' '.join('-' if r is None else f'{r:.0f}' for r in paired.get(name, []))
        lines.append(f"| {name} | {row['avg_loss']:.4f} | {row['worst_loss']:.4f} | {per_seed} | "
                     f"{reached_text} | {per_seed_reached} | {row['s_per_step']:.3f} |")
    lines += ['', f"pike_steps_to_mix_final = {_fmt(summary['pike_steps_to_mix_final'])} (goal <= 0.85); "
              f"balanced_worst_vs_mix = {_fmt(summary['balanced_worst_vs_mix'])} (goal < 1); "
              f"balanced_avg_vs_mix = {_fmt(summary['balanced_avg_vs_mix'])} (goal <= 1.01)", '',
              'Final held-out loss per domain (mean over seeds) and final weights (mean over seeds):', '',
              '| policy | ' + ' | '.join(domains) + ' | weights |', '|---|' + '---|' * (len(domains) + 1)]
    for name, seeds in runs.items():
        losses = [np.mean(final_values(seeds, f'metrics/val_{d}/LanguageCrossEntropy')) for d in domains]
        weights = [np.mean(final_values(seeds, f'mixture/weight/{d}')) for d in domains]
        lines.append(f'| {name} | ' + ' | '.join(f'{x:.4f}' for x in losses) + ' | ' +
                     ' '.join(f'{w:.2f}' for w in weights) + ' |')
    adaptive = [name for name, seeds in runs.items() if f'pike/noise_scale/{domains[0]}' in seeds[0]]
    if adaptive:
        lines += ['', "PiKE's statistics at its last check (mean over seeds): gradient noise scale sigma_k^2/G_k "
                  '(samples; a domain gets about B/K samples per step), G_k = ||E grad_k||^2, the mean pairwise '
                  'gradient cosine, and the lowest pairwise cosine seen in the run:', '',
                  '| policy | ' + ' | '.join(f'noise {d}' for d in domains) + ' | ' +
                  ' | '.join(f'G {d}' for d in domains) + ' | mean cos | min cos (run) |',
                  '|---|' + '---|' * (2 * len(domains) + 2)]
        for name in adaptive:
            seeds = runs[name]
            noise = [np.mean(final_values(seeds, f'pike/noise_scale/{d}')) for d in domains]
            grads = [np.mean(final_values(seeds, f'pike/grad_sq_norm/{d}')) for d in domains]
            pairs = [k for k in seeds[0] if k.startswith('pike/cosine/')]
            mean_cos = np.mean([final_values(seeds, k) for k in pairs])
            min_cos = np.mean([min(v for _, v in series['pike/min_cosine']) for series in seeds])
            lines.append(f'| {name} | ' + ' | '.join(f'{x:.3g}' for x in noise + grads) +
                         f' | {mean_cos:.3f} | {min_cos:.3f} |')
    return '\n'.join(lines) + '\n'


def _fmt(value: float | None) -> str:
    return 'null' if value is None else f'{value:.3f}'


def plot(summary: dict, runs: Mapping[str, Sequence[Mapping]], domains: Sequence[str], out: str) -> None:
    """results.png (loss curves, steps to Mix's final loss, s/step) and pike_stats.png (PiKE statistics)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(runs)
    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    for name in names:
        for axis, metric in ((axes[0, 0], AVG), (axes[0, 1], WORST)):
            steps, values = mean_curve([curve(series, metric) for series in runs[name]])
            axis.plot(steps, values, marker='.', label=name)
    if 'mix' in summary['policies']:
        axes[0, 0].axhline(summary['policies']['mix']['avg_loss'], color='grey', linestyle=':', label='Mix final')
    axes[0, 0].set(title='average held-out loss (mean over seeds)', xlabel='step', ylabel='nats/token')
    axes[0, 1].set(title='worst-domain held-out loss (mean over seeds)', xlabel='step', ylabel='nats/token')
    reached = [summary['policies'][n]['steps_to_mix_final'] for n in names]
    axes[1, 0].bar(names, [r if r is not None else 0 for r in reached],
                   color=['tab:blue' if r is not None else 'lightgrey' for r in reached])
    for i, r in enumerate(reached):
        axes[1, 0].text(i, r or 0, 'not reached' if r is None else f'{r:.0f}', ha='center', va='bottom', fontsize=8)
    axes[1, 0].set(title="steps to reach Mix's final average loss", ylabel='step')
    axes[1, 1].bar(names, [summary['policies'][n]['s_per_step'] for n in names])
    axes[1, 1].set(title='wall-clock per training step (eval excluded)', ylabel='seconds')
    for axis in axes[1]:
        axis.tick_params(axis='x', rotation=30)
    for axis in axes[0]:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(out, 'results.png'), dpi=100)
    plt.close(figure)

    adaptive = [n for n in names if f'pike/weight/{domains[0]}' in runs[n][0]]
    if not adaptive:
        return
    figure, axes = plt.subplots(len(adaptive), 3, figsize=(15, 3.6 * len(adaptive)), squeeze=False)
    for row, name in zip(axes, adaptive):
        series = runs[name][0]
        for d in domains:
            row[0].plot(*curve(series, f'mixture/weight/{d}'), label=d)
            row[1].plot(*curve(series, f'pike/noise_scale/{d}'), marker='.', label=d)
        row[2].plot(*curve(series, 'pike/min_cosine'), marker='.')
        row[0].set(title=f'{name} (first seed): weights', xlabel='step')
        row[1].set(title='gradient noise scale sigma^2/G (samples)', xlabel='step', yscale='log')
        row[2].set(title='minimum pairwise gradient cosine', xlabel='step')
        row[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(out, 'pike_stats.png'), dpi=100)
    plt.close(figure)


# --------------------------------------------------------------------------------------------- glue


def prepared_corpus(cache: str, seq_len: int) -> str:
    """The public corpus prepared at ``seq_len`` under ``cache`` (built the first time); its directory."""
    from streaming_prep.corpora import DEFAULT_MAX_MB, build_corpus

    out = os.path.join(cache, 'prepared', f'seq{seq_len}-mb{DEFAULT_MAX_MB:g}')
    if not os.path.isfile(os.path.join(out, 'manifest.json')):
        print(f'building the public corpus into {out} ...', flush=True)
        build_corpus(out, cache, seq_len=seq_len, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from streaming_prep.corpora import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help=f'{QUICK.steps} steps, seeds {QUICK.seeds}, tiny model')
    parser.add_argument('--data', help='a pike-prep manifest (directory or manifest.json) instead of the public corpus')
    parser.add_argument('--cache', default=DEFAULT_CACHE, help='downloads and prepared corpus (default: %(default)s)')
    parser.add_argument('--out', default='runs/mixing_quality', help='results directory (default: %(default)s)')
    parser.add_argument('--config', default=os.path.join(REPO, 'yamls', 'demo_cpu.yaml'),
                        help='base YAML for every run (default: %(default)s)')
    parser.add_argument('--policies', nargs='+', default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument('--seeds', nargs='+', type=int, help='seeds (default: the setting\'s)')
    parser.add_argument('--steps', type=int, help='training steps per run (default: the setting\'s)')
    parser.add_argument('--echo', action='store_true', help='show the training logs')
    parser.add_argument('overrides', nargs='*', help='key=value overrides for every run, after the setting\'s')
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    steps = args.steps or setting.steps
    seeds = args.seeds or list(setting.seeds)

    started = time.monotonic()
    data = args.data or prepared_corpus(args.cache, setting.seq_len)
    manifest_path = data if data.endswith('.json') else os.path.join(data, 'manifest.json')
    with open(manifest_path) as f:
        domains = list(json.load(f)['domains'])
    os.makedirs(args.out, exist_ok=True)
    runs: dict[str, list] = {}
    seconds: dict[str, list[float]] = {}
    for name in args.policies:
        for seed in seeds:
            run_dir = os.path.join(args.out, 'runs', name, f'seed{seed}')
            print(f'[{time.monotonic() - started:6.0f}s] {name} seed {seed} ...', flush=True)
            lines = run_training(args.config, run_dir, [
                *setting.overrides, *POLICIES[name], f'data.manifest={data}', f'run_name=mq-{name}-{seed}',
                f'seed={seed}', f'trainer.max_duration={steps}ba', 'trainer.console_log_interval=1ba',
                'trainer.progress_bar=false', *args.overrides], echo=args.echo)
            runs.setdefault(name, []).append(read_metrics(os.path.join(run_dir, 'metrics.jsonl')))
            seconds.setdefault(name, []).append(step_seconds(lines))

    summary = summarize(runs, seconds, steps)
    wall = time.monotonic() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    description = (f"{'quick' if args.quick else 'full'}, data {data}, {steps} steps x seeds {seeds}, "
                   f"overrides {' '.join([*setting.overrides, *args.overrides])}; benchmark wall time {wall:.0f} s, "
                   f"CPU time of the training processes {children.ru_utime + children.ru_stime:.0f} s")
    table = results_markdown(summary, runs, domains, steps, description)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(table)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump({**summary, 'steps': steps, 'seeds': seeds, 'data': data, 'domains': domains,
                   'overrides': [*setting.overrides, *args.overrides], 'wall_s': wall,
                   'per_seed': {name: {'avg_loss': final_values(r, AVG), 'worst_loss': final_values(r, WORST),
                                       's_per_step': seconds[name]} for name, r in runs.items()},
                   'paired_steps_to_mix_final': paired_steps_to_mix_final(runs) if 'mix' in runs else None},
                  f, indent=2)
    plot(summary, runs, domains, args.out)
    print(table)
    print(f'wrote {args.out}/results.md, results.json, results.png, pike_stats.png')
    print(json.dumps(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
