"""Overhead of PiKE over static uniform Mix: wall time and peak memory of the same short Composer run.

    .venv/bin/python benchmarks/pike_overhead.py [--quick] [--reps 3] [--device cpu]

Setup: the four-domain demo corpus (streaming_prep.demo, byte tokenizer, packed MDS shards written
by ``streaming_prep.pipeline.prepare`` into a temporary directory), the composer_pike mixture loader
and a GPT-2 built from config by ``composer_pike.train.build_model``; DecoupledAdamW and gradient
clipping at 1.0, as ``composer_pike.train`` uses. Policy ``mix`` trains with static uniform weights,
policy ``pike`` adds ``PiKE`` with everything else the same.

Check interval scaled like the paper: PiKE probes ``estimation_batch_size`` E samples per domain
every ``check_interval`` T0 steps, so probe samples / trained samples = K E / (T0 B). The paper
(E = 256 per domain, T0 = 1000, B = 256) has K / 1000; the default T0 here is the smallest that does
not exceed it, ceil(1000 E / B). The probe chunk E / M is B / 8 samples, as in the paper
(256 / 8 = 32 of 256).

Time phase (tiny model): every run is its own subprocess and the runs alternate mix, pike,
pike, mix, ... for ``--reps`` repetitions. ``--warmup`` steps are skipped (they hold the first
check and the first pooling of statistics, reported separately), then ``--checks * T0`` steps are timed from
BATCH_END to BATCH_END, so they hold exactly ``--checks`` checks. Wall time and the main process's
CPU time are both recorded (with the default ``--workers 0`` loading is in that process too). A
stopwatch in the PiKE runs measures the time spent inside PiKE (wall and CPU) and splits it into
the probe's sample reads, statistics accumulator and the rest (forward/backward), and the update
(weights, logging); 1 + (time inside PiKE) / (Mix time) is a second overhead figure that a loaded
machine disturbs much less than the ratio of two whole runs.

Memory phase (a larger model, so that one gradient copy is well above the noise of peak RSS):
a few steps with a check every other step, one subprocess per run. Peak memory is the process's
peak RSS (VmHWM, reset just before ``fit``) on CPU, with glibc's mmap threshold fixed at 64 KiB
(``--default-malloc`` to keep glibc's growing threshold, under which freed heap memory stays
resident and peak RSS measures fragmentation), and ``torch.cuda.max_memory_allocated`` on CUDA
(``--device gpu``); the gradient size in bytes is reported beside the difference.

K = 64 phase (the paper's setting at many domains, from time inside PiKE): the same demo text
cut into 64 equal slices, one domain each (``prepare_split_data``), a tiny model (``--k64-d-model``
x ``--k64-n-layers``, ``--k64-seq-len`` tokens), the paper's training batch B = 256 and E = 256
probe samples per probed domain in M = 8 chunks, and PiKE's default ``domains_per_check`` (None:
min(K, 8) = 8 domains per check, least recently probed first). 1000 steps of B = 256 are too slow
here, so checks are timed directly: a Mix run and PiKE runs that check every
``--k64-check-interval`` steps (``--k64-checks`` checks in the timed steps), and the overhead at
the paper's T0 = 1000 is 1 + (time inside PiKE per check) / (1000 x Mix time per training step).
By sample count the default probes 8 x 256 = 2048 samples per 1000 x 256 = 256000 trained (0.8%);
``domains_per_check = 64`` (every domain at every check, the old behaviour, 6.4%) is measured
beside it for comparison.

The last line printed is JSON: overhead_ratio (median PiKE / median Mix wall time of the timed
steps), probe_fwd_bwd_per_check (extra forward+backward micro-batches per check, counted),
peak_mem_ratio (median PiKE / median Mix peak memory, memory phase), overhead_ratio_k64 and
overhead_ratio_k64_all_domains (K = 64 phase, at T0 = 1000, with k64_pike_ms_per_check,
k64_pike_ms_per_check_all_domains and k64_step_ms behind them), then the absolute figures.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

PAPER_ESTIMATION_BATCH, PAPER_CHECK_INTERVAL, PAPER_BATCH, PAPER_NUM_CHUNKS = 256, 1000, 256, 8
K64 = 64  # domains of the K = 64 phase
WORKER_OPTIONS = ('d_model', 'n_layers', 'n_heads', 'batch', 'estimation_batch', 'num_chunks', 'check_interval',
                  'checks', 'warmup', 'workers', 'threads', 'device', 'domains_per_check')


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def paper_check_interval(estimation_batch_size: int, batch_size: int) -> int:
    """Smallest T0 with probe / trained samples K E / (T0 B) <= the paper's 256 K / (1000 * 256)."""
    return math.ceil(PAPER_CHECK_INTERVAL * PAPER_BATCH * estimation_batch_size
                     / (PAPER_ESTIMATION_BATCH * batch_size))


def prepare_data(root: str, max_mb: float, seq_len: int) -> str:
    """The demo corpus as byte-tokenized MDS shards under ``root/mds``; returns the manifest directory."""
    from streaming_prep.demo import build_demo_corpus
    from streaming_prep.pipeline import prepare

    out = os.path.join(root, 'mds')
    domains = build_demo_corpus(os.path.join(root, 'raw'), max_mb_per_domain=max_mb)
    prepare(domains, out, seq_len=seq_len, val_fraction=0.0, workers=1, progress=False)
    return out


def prepare_split_data(root: str, num_domains: int, max_mb: float, seq_len: int) -> str:
    """The demo corpus's text cut into ``num_domains`` equal contiguous slices, one domain each, as
    byte-tokenized MDS shards under ``root/mds_k<num_domains>``; returns the manifest directory."""
    from streaming_prep.demo import build_demo_corpus
    from streaming_prep.pipeline import prepare

    texts = []
    for path in build_demo_corpus(os.path.join(root, 'raw'), max_mb_per_domain=max_mb).values():
        with open(path, encoding='utf-8') as f:
            texts += [json.loads(line)['text'] for line in f]
    text = '\n'.join(texts)
    size = len(text) // num_domains
    split = os.path.join(root, f'raw_k{num_domains}')
    os.makedirs(split, exist_ok=True)
    domains = {}
    for k in range(num_domains):
        domains[f'd{k:02d}'] = os.path.join(split, f'd{k:02d}.jsonl')
        with open(domains[f'd{k:02d}'], 'w', encoding='utf-8') as f:
            f.write(json.dumps({'text': text[k * size:(k + 1) * size]}) + '\n')
    out = os.path.join(root, f'mds_k{num_domains}')
    prepare(domains, out, seq_len=seq_len, val_fraction=0.0, workers=1, progress=False)
    return out


# --------------------------------------------------------------------------------------------- one run


class Stopwatch:
    """Wall seconds, CPU seconds and calls per label of the callables it wraps (PiKE runs only)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original: Callable = getattr(owner, name)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[label] += time.perf_counter() - wall
                self.totals[f'{label}_cpu'] += time.process_time() - cpu
                self.totals[f'{label}_calls'] += 1

        setattr(owner, name, timed)

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def instrument_pike(stopwatch: Stopwatch) -> None:
    """Time PiKE's parts: the probe (sample reads, accumulator; the rest is forward/backward) and the update."""
    from composer.models import HuggingFaceModel

    from composer_pike.algorithms import PiKE
    from composer_pike.data import MixtureDataset
    from composer_pike.stats import GradientStatsAccumulator

    stopwatch.wrap(PiKE, 'apply', 'pike_apply')
    stopwatch.wrap(PiKE, '_probe', 'probe')
    stopwatch.wrap(MixtureDataset, 'probe_batch', 'probe_data')
    for name in ('__init__', 'begin_domain', 'add_chunk', 'end_domain', 'finalize'):
        stopwatch.wrap(GradientStatsAccumulator, name, f'accumulator_{name.strip("_")}')
    stopwatch.wrap(PiKE, '_update', 'update')
    stopwatch.wrap(PiKE, '_log', 'logging')
    stopwatch.wrap(HuggingFaceModel, 'forward', 'forward')


def make_step_clock(marks_at: tuple[int, int], stopwatch: Stopwatch):
    """A Composer callback: wall time, CPU time and stopwatch totals at BATCH_END of the steps ``marks_at``."""
    from composer import Callback, Event

    class StepClock(Callback):
        def __init__(self) -> None:
            self.marks: dict[int, tuple[float, float, dict[str, float]]] = {}

        def run_event(self, event, state, logger) -> None:
            if event == Event.BATCH_END:
                step = int(state.timestamp.batch) - 1  # the step that just ended
                if step in marks_at:
                    self.marks[step] = (time.perf_counter(), time.process_time(), stopwatch.snapshot())

    return StepClock()


def build_trainer(args: argparse.Namespace, policy: str, callbacks: list) -> Any:
    """Model, mixture loader and Trainer; policy 'pike' adds the PiKE algorithm, 'mix' nothing."""
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.optim import DecoupledAdamW

    from composer_pike.algorithms import PiKE
    from composer_pike.data import MixtureDataset, build_mixture_dataloader, read_manifest, sources_from_manifest
    from composer_pike.train import build_model, load_config

    config = load_config(None, [f'data.manifest={args.data}', f'model.d_model={args.d_model}',
                                f'model.n_layers={args.n_layers}', f'model.n_heads={args.n_heads}'])
    dataset = MixtureDataset(sources_from_manifest(args.data, 'train'))
    loader = build_mixture_dataloader(dataset, args.batch, seed=0, num_workers=args.workers,
                                      prefetch_factor=2 if args.workers else None)
    tokenizer = read_manifest(args.data)['tokenizer']
    model = build_model(config, tokenizer['vocab_size'], dataset.seq_len, tokenizer['eos_token_id'],
                        tokenizer['pad_token_id'])
    algorithms: list[Any] = [GradientClipping(clipping_type='norm', clipping_threshold=1.0)]
    if policy == 'pike':
        # first_check=0: the untimed warmup holds the first check (every domain), the window whole intervals
        algorithms.append(PiKE(check_interval=args.check_interval, estimation_batch_size=args.estimation_batch,
                               num_chunks=args.num_chunks, domains_per_check=args.domains_per_check, first_check=0))
    return Trainer(model=model, train_dataloader=loader, algorithms=algorithms, callbacks=callbacks, loggers=[],
                   max_duration=f'{args.warmup + args.checks * args.check_interval}ba',
                   optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=1e-4),
                   device=args.device, progress_bar=False, log_to_console=False, seed=17)


def reset_peak_memory(device: str) -> None:
    import torch

    if device == 'gpu':
        torch.cuda.reset_peak_memory_stats()
    else:
        with open('/proc/self/clear_refs', 'w') as f:  # Linux: resets VmHWM to the current RSS
            f.write('5')


def peak_memory_bytes(device: str) -> int:
    import torch

    if device == 'gpu':
        return int(torch.cuda.max_memory_allocated())
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Train once with policy ``args.worker``: timed window, peak memory and PiKE's time breakdown."""
    import torch

    torch.set_num_threads(args.threads)
    stopwatch = Stopwatch()
    if args.worker == 'pike':
        instrument_pike(stopwatch)
    first, last = args.warmup - 1, args.warmup + args.checks * args.check_interval - 1
    clock = make_step_clock((first, last), stopwatch)
    trainer = build_trainer(args, args.worker, [clock])
    params = [p for p in trainer.state.model.parameters() if p.requires_grad]
    reset_peak_memory(args.device)
    trainer.fit()
    peak = peak_memory_bytes(args.device)
    trainer.close()
    (wall0, cpu0, before), (wall1, cpu1, after) = clock.marks[first], clock.marks[last]
    result = {'policy': args.worker, 'window_s': wall1 - wall0, 'window_cpu_s': cpu1 - cpu0,
              'window_steps': last - first, 'peak_bytes': peak, 'num_params': sum(p.numel() for p in params),
              'grad_bytes': sum(p.numel() * p.element_size() for p in params)}  # one process: the whole gradient
    if args.worker == 'pike':
        window = {key: after[key] - before.get(key, 0.0) for key in after}
        result.update({
            'window': window,
            'first_check_s': before['pike_apply'],  # steps 0 .. warmup-1 hold only the first check
            # the window's own checks (the first check, which probes every domain, is in the warmup);
            # one training forward per step (no training microbatches)
            'probe_fwd_bwd_per_check': (window['forward_calls'] - (last - first)) / args.checks,
        })
    return result


# --------------------------------------------------------------------------------------------- driver


def spawn(args: argparse.Namespace, policy: str, env: dict[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    """One run in a fresh interpreter (``env`` added to its environment); returns its JSON result.

    ``overrides`` replace worker options (None: the worker's default) and may name other ``data``."""
    options = {**{key: getattr(args, key) for key in WORKER_OPTIONS}, **overrides}
    command = [sys.executable, os.path.abspath(__file__), '--worker', policy, '--data', options.pop('data', args.data)]
    for key, value in options.items():
        if value is not None:
            command += [f'--{key.replace("_", "-")}', str(value)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **(env or {}), OMP_NUM_THREADS=str(options['threads']),
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')])))
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if completed.returncode:
        raise RuntimeError(f'{policy} run failed:\n{completed.stderr[-4000:]}')
    return json.loads(completed.stdout.strip().splitlines()[-1])


def alternating(reps: int, run: Callable[[str], dict[str, Any]], label: str) -> dict[str, list[dict[str, Any]]]:
    """mix, pike, pike, mix, ... so that a drift in machine load hits both policies alike."""
    runs: dict[str, list[dict[str, Any]]] = {'mix': [], 'pike': []}
    for rep in range(reps):
        for policy in (('mix', 'pike') if rep % 2 == 0 else ('pike', 'mix')):
            result = run(policy)
            runs[policy].append(result)
            log(f'{label} rep {rep} {policy}: {result["window_s"]:.2f} s wall, {result["window_cpu_s"]:.2f} s CPU '
                f'timed, peak {result["peak_bytes"] / 2**20:.1f} MiB'
                + (f', in PiKE {result["window"]["pike_apply"]:.3f} s' if policy == 'pike' else ''))
    return runs


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def k64_case(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """The K = 64 phase: Mix, PiKE (default domains_per_check) and PiKE (all 64 domains) runs that check
    every ``--k64-check-interval`` steps; the overhead at T0 = 1000 from time inside PiKE per check."""
    start = time.perf_counter()
    data = prepare_split_data(root, K64, args.max_mb, args.k64_seq_len)
    options = dict(data=data, d_model=args.k64_d_model, n_layers=args.k64_n_layers, batch=PAPER_BATCH,
                   estimation_batch=PAPER_ESTIMATION_BATCH, num_chunks=PAPER_NUM_CHUNKS,
                   check_interval=args.k64_check_interval, checks=args.k64_checks, warmup=1)
    log(f'K = {K64} data ready in {time.perf_counter() - start:.0f} s; a check every {args.k64_check_interval} '
        f'steps, {args.k64_checks} check(s) timed, {args.k64_reps} repetition(s)')
    variants = {'mix': ('mix', None), 'pike': ('pike', None), 'pike_all_domains': ('pike', K64)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for rep in range(args.k64_reps):  # alternating order, as in the other phases
        for name in (list(variants) if rep % 2 == 0 else list(reversed(variants))):
            policy, per_check = variants[name]
            result = spawn(args, policy, domains_per_check=per_check, **options)
            runs[name].append(result)
            log(f'k64 rep {rep} {name}: {result["window_s"]:.2f} s wall timed ({result["window_steps"]} steps)'
                + (f', in PiKE {result["window"]["pike_apply"]:.3f} s' if policy == 'pike' else ''))
    steps = runs['mix'][0]['window_steps']
    step_s, step_cpu_s = median(runs['mix'], 'window_s') / steps, median(runs['mix'], 'window_cpu_s') / steps
    summary: dict[str, Any] = {'step_ms': 1e3 * step_s, 'step_cpu_ms': 1e3 * step_cpu_s}
    for name in ('pike', 'pike_all_domains'):
        in_pike = {key: statistics.median(r['window'][key] for r in runs[name]) / args.k64_checks
                   for key in ('pike_apply', 'pike_apply_cpu', 'probe', 'probe_data', 'update')}
        fwd_bwd = statistics.median(r['probe_fwd_bwd_per_check'] for r in runs[name])
        domains = fwd_bwd / PAPER_NUM_CHUNKS  # one forward/backward per chunk (chunk 32 <= the micro-batch)
        summary[name] = {
            'overhead_ratio': 1 + in_pike['pike_apply'] / (PAPER_CHECK_INTERVAL * step_s),
            'overhead_ratio_cpu_time': 1 + in_pike['pike_apply_cpu'] / (PAPER_CHECK_INTERVAL * step_cpu_s),
            'pike_ms_per_check': {'pike_total': round(1e3 * in_pike['pike_apply'], 1),
                                  'pike_total_cpu': round(1e3 * in_pike['pike_apply_cpu'], 1),
                                  'probe_total': round(1e3 * in_pike['probe'], 1),
                                  'probe_sample_reads': round(1e3 * in_pike['probe_data'], 1),
                                  'update_total': round(1e3 * in_pike['update'], 1)},
            'probe_fwd_bwd_per_check': fwd_bwd,
            'domains_probed_per_check': domains,
            'probe_over_trained_samples': domains * PAPER_ESTIMATION_BATCH / (PAPER_CHECK_INTERVAL * PAPER_BATCH),
            # the same step time from the PiKE runs themselves (their timed steps less the time in PiKE)
            'step_ms_in_pike_runs': 1e3 * statistics.median(
                (r['window_s'] - r['window']['pike_apply']) / r['window_steps'] for r in runs[name]),
            'timed_s_reps': [round(r['window_s'], 2) for r in runs[name]],
        }
    summary['mix_timed_s_reps'] = [round(r['window_s'], 2) for r in runs['mix']]
    summary['config'] = {'domains': K64, 'batch': PAPER_BATCH, 'seq_len': args.k64_seq_len,
                         'estimation_batch_per_domain': PAPER_ESTIMATION_BATCH, 'num_chunks': PAPER_NUM_CHUNKS,
                         'ratio_at_check_interval': PAPER_CHECK_INTERVAL,
                         'measured_check_interval': args.k64_check_interval, 'checks_timed': args.k64_checks,
                         'timed_steps': steps, 'reps': args.k64_reps,
                         'model': {'d_model': args.k64_d_model, 'n_layers': args.k64_n_layers,
                                   'params': runs['mix'][0]['num_params']}}
    summary['phase_wall_s'] = time.perf_counter() - start
    return summary


def summarise(timing: dict[str, list[dict[str, Any]]], memory: dict[str, list[dict[str, Any]]],
              args: argparse.Namespace, num_domains: int, k64: dict[str, Any] | None) -> dict[str, Any]:
    mix, pike = timing['mix'], timing['pike']
    mix_s, mix_cpu_s = median(mix, 'window_s'), median(mix, 'window_cpu_s')
    in_pike = {key: statistics.median(r['window'][key] for r in pike) for key in pike[0]['window']}
    accumulator = sum(v for k, v in in_pike.items()
                      if k.startswith('accumulator_') and not k.endswith(('_cpu', '_calls')))
    per_check_ms = {
        'pike_total': in_pike['pike_apply'],
        'pike_total_cpu': in_pike['pike_apply_cpu'],
        'probe_total': in_pike['probe'],
        'probe_sample_reads': in_pike['probe_data'],
        'probe_statistics_accumulator': accumulator,
        'probe_forward_backward_and_rest': in_pike['probe'] - in_pike['probe_data'] - accumulator,
        'update_total': in_pike['update'],
        'update_logging': in_pike['logging'],
    }
    per_check_ms = {key: round(1e3 * value / args.checks, 2) for key, value in per_check_ms.items()}
    mem_mix, mem_pike = median(memory['mix'], 'peak_bytes'), median(memory['pike'], 'peak_bytes')
    return {
        'overhead_ratio': median(pike, 'window_s') / mix_s,
        'probe_fwd_bwd_per_check': statistics.median(r['probe_fwd_bwd_per_check'] for r in pike),
        'peak_mem_ratio': mem_pike / mem_mix,
        'overhead_ratio_k64': k64 and k64['pike']['overhead_ratio'],
        'overhead_ratio_k64_all_domains': k64 and k64['pike_all_domains']['overhead_ratio'],
        'k64_pike_ms_per_check': k64 and k64['pike']['pike_ms_per_check']['pike_total'],
        'k64_pike_ms_per_check_all_domains': k64 and k64['pike_all_domains']['pike_ms_per_check']['pike_total'],
        'k64_step_ms': k64 and k64['step_ms'],
        'overhead_ratio_cpu_time': median(pike, 'window_cpu_s') / mix_cpu_s,
        'overhead_ratio_from_time_in_pike': (mix_s + in_pike['pike_apply']) / mix_s,
        'overhead_ratio_from_cpu_time_in_pike': (mix_cpu_s + in_pike['pike_apply_cpu']) / mix_cpu_s,
        'timed_steps': mix[0]['window_steps'],
        'mix_timed_s': mix_s,
        'pike_timed_s': median(pike, 'window_s'),
        'mix_timed_cpu_s': mix_cpu_s,
        'pike_timed_cpu_s': median(pike, 'window_cpu_s'),
        'mix_step_ms': 1e3 * mix_s / mix[0]['window_steps'],
        'pike_ms_per_check': per_check_ms,
        'first_check_s': median(pike, 'first_check_s'),
        'mix_timed_s_reps': [round(r['window_s'], 2) for r in mix],
        'pike_timed_s_reps': [round(r['window_s'], 2) for r in pike],
        'mix_timed_cpu_s_reps': [round(r['window_cpu_s'], 2) for r in mix],
        'pike_timed_cpu_s_reps': [round(r['window_cpu_s'], 2) for r in pike],
        'mix_peak_bytes': mem_mix,
        'pike_peak_bytes': mem_pike,
        'peak_delta_bytes': mem_pike - mem_mix,
        'grad_bytes': memory['mix'][0]['grad_bytes'],
        'mix_peak_mib_reps': [round(r['peak_bytes'] / 2**20, 1) for r in memory['mix']],
        'pike_peak_mib_reps': [round(r['peak_bytes'] / 2**20, 1) for r in memory['pike']],
        'time_phase_peak_mib': {'mix': round(median(mix, 'peak_bytes') / 2**20, 1),
                                'pike': round(median(pike, 'peak_bytes') / 2**20, 1),
                                'grad_mib': round(mix[0]['grad_bytes'] / 2**20, 2)},
        'config': {'domains': num_domains, 'batch': args.batch, 'seq_len': args.seq_len,
                   'estimation_batch_per_domain': args.estimation_batch, 'num_chunks': args.num_chunks,
                   'check_interval': args.check_interval, 'checks_timed': args.checks, 'warmup_steps': args.warmup,
                   'domains_per_check': args.domains_per_check,
                   'probe_over_trained_samples': num_domains * args.estimation_batch
                   / (args.check_interval * args.batch),
                   'paper_probe_over_trained_samples': num_domains / PAPER_CHECK_INTERVAL,
                   'time_model': {'d_model': args.d_model, 'n_layers': args.n_layers,
                                  'params': mix[0]['num_params']},
                   'memory_model': {'d_model': args.mem_d_model, 'n_layers': args.mem_n_layers,
                                    'params': memory['mix'][0]['num_params']},
                   'reps': args.reps, 'mem_reps': args.mem_reps, 'workers': args.workers,
                   'memory_malloc': 'default' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=65536',
                   'torch_threads': args.threads, 'device': args.device, 'cpus': os.cpu_count()},
        'k64': k64,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='E 4 in M 2 chunks (T0 250), 2 repetitions, 1 memory repetition (about 3 CPU-minutes)')
    parser.add_argument('--reps', type=int, default=3, help='repetitions of the time phase (per policy)')
    parser.add_argument('--mem-reps', type=int, default=2, help='repetitions of the memory phase (per policy)')
    parser.add_argument('--checks', type=int, default=1, help='checks inside the timed steps')
    parser.add_argument('--warmup', type=int, default=10, help='untimed first steps (they hold the first check)')
    parser.add_argument('--batch', type=int, default=16, help='global batch (samples)')
    parser.add_argument('--seq-len', type=int, default=64)
    parser.add_argument('--d-model', type=int, default=64, help='time-phase model width')
    parser.add_argument('--n-layers', type=int, default=2)
    parser.add_argument('--n-heads', type=int, default=4)
    parser.add_argument('--mem-d-model', type=int, default=384, help='memory-phase model width')
    parser.add_argument('--mem-n-layers', type=int, default=4)
    parser.add_argument('--estimation-batch', type=int, default=8, help='probe samples E per domain per check')
    parser.add_argument('--num-chunks', type=int, default=4)
    parser.add_argument('--domains-per-check', type=int,
                        help="PiKE's domains_per_check (4-domain phases); default: PiKE's, min(K, 8)")
    parser.add_argument('--check-interval', type=int, help='default: the paper-scaled ceil(1000 E / B)')
    parser.add_argument('--workers', type=int, default=0, help='loader worker processes')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'gpu'])
    parser.add_argument('--default-malloc', action='store_true',
                        help="memory phase with glibc's default (dynamic) mmap threshold")
    parser.add_argument('--max-mb', type=float, default=1.0, help='text in the largest demo domain (MB)')
    parser.add_argument('--k64-seq-len', type=int, default=32, help='K = 64 phase: tokens per sample')
    parser.add_argument('--k64-d-model', type=int, default=32, help='K = 64 phase: model width')
    parser.add_argument('--k64-n-layers', type=int, default=2)
    parser.add_argument('--k64-check-interval', type=int, default=10,
                        help='K = 64 phase: steps between the timed checks (the ratio is computed at T0 = 1000)')
    parser.add_argument('--k64-checks', type=int, default=1, help='K = 64 phase: checks inside the timed steps')
    parser.add_argument('--k64-reps', type=int, default=1,
                        help='K = 64 phase: repetitions (per run kind); 0 skips the phase (its keys print null)')
    parser.add_argument('--worker', choices=['mix', 'pike'], help=argparse.SUPPRESS)
    parser.add_argument('--data', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.mem_reps, args.estimation_batch, args.num_chunks = 2, 1, 4, 2
    if args.check_interval is None:
        args.check_interval = paper_check_interval(args.estimation_batch, args.batch)
    if not 1 <= args.warmup < args.check_interval:
        parser.error(f'--warmup must be in [1, check_interval = {args.check_interval}), got {args.warmup}')
    if args.k64_check_interval < 2:
        parser.error(f'--k64-check-interval must be >= 2 (its first step is untimed), got {args.k64_check_interval}')
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(run_one(args)))
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='pike-overhead-') as root:
        args.data = prepare_data(root, args.max_mb, args.seq_len)
        with open(os.path.join(args.data, 'manifest.json')) as f:
            num_domains = len(json.load(f)['domains'])
        log(f'data ready in {time.perf_counter() - start:.0f} s; T0 = {args.check_interval}, {args.checks} check(s) '
            f'in {args.checks * args.check_interval} timed steps, {args.reps} repetitions')
        timing = alternating(args.reps, lambda policy: spawn(args, policy), 'time')
        # glibc's default keeps freed heap memory resident (its mmap threshold grows with every large
        # free), so peak RSS would measure fragmentation; a fixed threshold returns large blocks at once.
        malloc = {} if args.default_malloc or args.device == 'gpu' else {'MALLOC_MMAP_THRESHOLD_': '65536'}
        memory = alternating(args.mem_reps, lambda policy: spawn(
            args, policy, env=malloc, d_model=args.mem_d_model, n_layers=args.mem_n_layers, check_interval=2,
            checks=1, warmup=1), 'memory')
        k64 = k64_case(args, root) if args.k64_reps else None
        summary = summarise(timing, memory, args, num_domains, k64)
    summary['benchmark_wall_s'] = time.perf_counter() - start
    log(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == '__main__':
    main()
