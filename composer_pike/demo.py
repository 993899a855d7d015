"""The README's main job: PiKE and loss-slope mixing vs uniform Mix on the four-domain demo corpus, on CPU.

1. Builds the demo corpus (text shipped with Python itself) into ``runs/demo/data`` with pike-prep
   (skipped when its manifest exists).
2. Trains the same small model with each policy for the same number of steps
   (``composer_pike.train yamls/demo_cpu.yaml``, one subprocess per policy).
3. Prints a per-domain table (final held-out loss per domain, average, worst, final weights) and
   writes ``runs/demo/demo.png`` with the weight trajectories and held-out loss curves.

Run: ``python -m composer_pike.demo [--policies mix pike loss_slope] [key=value ...]`` (e.g. ``trainer.max_duration=200ba``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

DEMO_ROOT = 'runs/demo'


def build_corpus(data_dir: str, seq_len: int) -> None:
    """Run the demo corpus builder unless ``data_dir`` already holds a manifest."""
    if os.path.isfile(os.path.join(data_dir, 'manifest.json')):
        print(f'demo corpus: reusing {data_dir}')
        return
    subprocess.run([sys.executable, '-m', 'streaming_prep.demo', '--out', data_dir, '--seq-len', str(seq_len)],
                   check=True)


def run_training(config: str, run_dir: str, overrides: Sequence[str], *, echo: bool = True) -> list[tuple[float, str]]:
    """Train once in a subprocess: ``python -m composer_pike.train CONFIG run_dir=RUN_DIR OVERRIDES...``.

    Removes an old ``RUN_DIR/metrics.jsonl`` first (the logger appends to it). Returns the console
    lines with their arrival time (seconds since launch), also written to ``RUN_DIR/console.log``
    as ``seconds<TAB>line``; prints them as they come when ``echo``. Raises RuntimeError naming the
    log when training fails.
    """
    os.makedirs(run_dir, exist_ok=True)
    metrics = os.path.join(run_dir, 'metrics.jsonl')
    if os.path.exists(metrics):
        os.remove(metrics)
    command = [sys.executable, '-m', 'composer_pike.train', config, f'run_dir={run_dir}', *overrides]
    log_path = os.path.join(run_dir, 'console.log')
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    with open(log_path, 'w') as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'}) as proc:
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip('\n')))
            log.write(f'{lines[-1][0]:.3f}\t{lines[-1][1]}\n')
            if echo:
                print(line, end='', flush=True)
    if proc.returncode != 0:
        tail = '\n'.join(line for _, line in lines[-15:])
        raise RuntimeError(f'training exited with code {proc.returncode} ({" ".join(command)}); '
                           f'log: {log_path}\n{tail}')
    return lines


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """``metrics.jsonl`` as {metric: [(step, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            step = record.pop('step')
            for name, value in record.items():
                series[name].append((step, value))
    return series


def summary_table(runs: dict[str, dict], domains: list[str]) -> str:
    """Markdown table: one row per policy, final held-out loss per domain, average, worst, weights."""
    header = ['policy'] + [f'val {d}' for d in domains] + ['average', 'worst', 'final weights']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for policy, series in runs.items():
        losses = [series[f'metrics/val_{d}/LanguageCrossEntropy'][-1][1] for d in domains]
        shown = ' '.join(f"{series[f'mixture/weight/{d}'][-1][1]:.2f}" for d in domains)
        lines.append('| ' + ' | '.join([policy] + [f'{x:.4f}' for x in losses] +
                                       [f'{sum(losses) / len(losses):.4f}', f'{max(losses):.4f}', shown]) + ' |')
    return '\n'.join(lines)


def plot(runs: dict[str, dict], domains: list[str], path: str) -> None:
    """Weight trajectories of adaptive runs (left) and held-out loss curves (right)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy, series in runs.items():
        for d in domains:
            if f'pike/weight/{d}' in series or f'loss_slope/weight/{d}' in series:  # adaptive policies
                steps, values = zip(*series[f'mixture/weight/{d}'])
                left.plot(steps, values, label=f'{policy}: {d}')
        for name, style in (('eval/avg_loss', '-'), ('eval/worst_loss', '--')):
            if name in series:
                steps, values = zip(*series[name])
                right.plot(steps, values, style, label=f'{policy}: {name.split("/")[1]}')
    left.set(title='mixing weights', xlabel='step', ylabel='weight')
    right.set(title='held-out loss (nats/token)', xlabel='step', ylabel='cross-entropy')
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--policies', nargs='+', default=['mix', 'pike', 'loss_slope'])
    parser.add_argument('--config', default='yamls/demo_cpu.yaml')
    parser.add_argument('--root', default=DEMO_ROOT)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('overrides', nargs='*', help='key=value overrides passed to every training run')
    args = parser.parse_args(argv)

    data_dir = os.path.join(args.root, 'data')
    build_corpus(data_dir, args.seq_len)
    runs = {}
    for policy in args.policies:
        run_dir = os.path.join(args.root, policy)
        print(f'training with mixing.policy={policy} ...', flush=True)
        run_training(args.config, run_dir, [f'mixing.policy={policy}', f'data.manifest={data_dir}',
                                            f'run_name=demo-{policy}', *args.overrides])
        runs[policy] = read_metrics(os.path.join(run_dir, 'metrics.jsonl'))

    with open(os.path.join(data_dir, 'manifest.json')) as f:
        domains = list(json.load(f)['domains'])
    table = summary_table(runs, domains)
    png = os.path.join(args.root, 'demo.png')
    plot(runs, domains, png)
    with open(os.path.join(args.root, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    print(f'wrote {png} and {os.path.join(args.root, "results.md")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
