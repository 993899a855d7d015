"""End-to-end tests of the PiKE Composer algorithm on CPU with a tiny GPT-2 (n_embd 32, 2 layers).

Covers: the metrics logged at every check and the effective-step rule of the mixture loader;
that the probe leaves training untouched; microbatching, bf16 and gradient clipping; exact
checkpoint/resume; two processes (FSDP2 and DDP) through the composer launcher; bad input;
Balanced-PiKE. The shared builders live in tests/algorithm_worker.py (also the per-rank script).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from composer import Callback, Event, Trainer
from composer.loggers import InMemoryLogger

import composer_pike.algorithms.pike as algorithm_module
import composer_pike.algorithms.probe as probe_module
from composer_pike.algorithms import LossSlope, PiKE
from composer_pike.algorithms.conflicts import conflict_report
from composer_pike.data import MixtureDataset, loader_lookahead
from composer_pike.data.planner import validate_weights
from composer_pike.weights import (apply_scores, apportion, balanced_coefficients, default_min_weight,
                                   epoch_cap_upper_bounds, evidence_scores, pike_update)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import algorithm_worker as worker  # noqa: E402
from launch_helpers import free_port  # noqa: E402
from algorithm_worker import (  # noqa: E402
    BATCH_SIZE, DOMAIN_SIZES, Recorder, build_dataset, build_loader, build_model, domain_dirs, make_pike, pike_series,
    write_data)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / 'algorithm_worker.py'
NAMES = [f'd{k}' for k in range(len(DOMAIN_SIZES))]
PER_DOMAIN = ('weight', 'batch_count', 'epochs', 'score', 'grad_sq_norm', 'grad_sq_norm_se', 'variance', 'variance_se',
              'probe_loss', 'noise_scale', 'noise_dim', 'advantage', 'advantage_se', 'pooled/grad_sq_norm',
              'pooled/grad_sq_norm_se', 'pooled/variance', 'pooled/variance_se', 'pooled/samples', 'pooled/probe_loss')


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Two shared CPU cores: one intra-op thread is ~20x faster than two for this tiny model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def data_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('pike_domains')
    write_data(root)
    return root


@pytest.fixture(scope='module')
def dataset(data_template, tmp_path_factory) -> MixtureDataset:
    """One MixtureDataset for the module; every run gets its own loader (planner, sampler) over it."""
    return build_dataset(copy_data(data_template, tmp_path_factory.mktemp('shared')))


def copy_data(template: Path, dest: Path, num_domains: int = len(DOMAIN_SIZES)) -> list[str]:
    """A private copy of the domains (each StreamingDataset wants its own local directory)."""
    for k in range(num_domains):
        shutil.copytree(template / f'd{k}', dest / f'd{k}')
    return domain_dirs(dest, num_domains)


@dataclass
class Run:
    trainer: Trainer
    series: dict[str, list[tuple[int, float]]]
    recorder: Recorder
    loader: Any
    params: dict[str, torch.Tensor]

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series[key]]

    def stats_at_first_check(self) -> dict[str, np.ndarray]:
        return {kind: np.array([self.series[f'pike/{kind}/{n}'][0][1] for n in NAMES])
                for kind in ('grad_sq_norm', 'variance', 'probe_loss', 'weight')}


def fit(data: list[str] | MixtureDataset, *, algorithms=(), max_duration: str = '8ba', num_workers: int = 0, model=None,
        callbacks=(), loader_kwargs: dict | None = None, **trainer_kwargs) -> Run:
    model = model if model is not None else build_model()
    loader = build_loader(data, num_workers=num_workers, **(loader_kwargs or {}))
    memory = InMemoryLogger()
    recorder = Recorder()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=max_duration, algorithms=list(algorithms),
                      callbacks=[recorder, *callbacks], loggers=[memory], device='cpu', progress_bar=False, seed=3,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), **trainer_kwargs)
    trainer.fit()
    params = {name: p.detach().clone() for name, p in trainer.state.model.named_parameters()}
    trainer.close()
    return Run(trainer, pike_series(memory), recorder, loader, params)


def step_counts(recorder: Recorder, num_domains: int = len(DOMAIN_SIZES)) -> dict[int, np.ndarray]:
    return {s: np.bincount([d for d, _ in rows], minlength=num_domains) for s, rows in recorder.rows.items()}


def expected_counts(series: dict, steps, batch_size: int = BATCH_SIZE) -> dict[int, np.ndarray]:
    """Per-step batch counts implied by the logged weights and effective steps (uniform before)."""
    logged_at = [b for b, _ in series.get('pike/effective_step', [])]
    effective = [int(v) for _, v in series.get('pike/effective_step', [])]
    weights = {b: np.array([dict(series[f'pike/weight/{n}'])[b] for n in NAMES]) for b in logged_at}
    schedule = [(0, np.full(len(NAMES), 1 / len(NAMES)))] + [(e, weights[b]) for b, e in zip(logged_at, effective)]
    result = {}
    for step in steps:
        in_force = [w for start, w in schedule if start <= step][-1]
        result[step] = apportion(validate_weights(in_force, len(NAMES)), batch_size, min_count=1)
    return result


@pytest.fixture(scope='module')
def reference(dataset) -> Run:
    """Plain PiKE (fp32, no microbatching, evidence rule without threshold), a check at both of 2 batches."""
    return fit(dataset, algorithms=[make_pike(check_interval=1)], max_duration='2ba')


class ForwardSizes(Callback):
    """Batch sizes of every forward pass, split by whether it ran inside the probe (BEFORE_TRAIN_BATCH)."""

    def __init__(self) -> None:
        self.in_probe = False
        self.probe: list[int] = []
        self.training: list[int] = []
        self.logits_dtypes: set[torch.dtype] = set()

    def attach(self, model: torch.nn.Module) -> None:
        def hook(module, args, kwargs, output):
            size = int(kwargs['input_ids'].shape[0]) if 'input_ids' in kwargs else int(args[0].shape[0])
            (self.probe if self.in_probe else self.training).append(size)
            if self.in_probe:
                self.logits_dtypes.add(output.logits.dtype)
        model.model.register_forward_hook(hook, with_kwargs=True)

    def run_event(self, event: Event, state, logger) -> None:
        # Callbacks run after algorithms for each event: flip the flag around PiKE's probe.
        if event == Event.BATCH_START:
            self.in_probe = True
        elif event == Event.BEFORE_TRAIN_BATCH:
            self.in_probe = False


# --------------------------------------------------------------------------------------------- 1. metrics, effective step



def test_a_check_batch_retried_after_an_oom_is_probed_once():
    """Composer fires BEFORE_TRAIN_BATCH again when automatic microbatching retries a batch after a CUDA
    OOM; the probe already pending for that batch stands (a second one would read new probe samples)."""
    from types import SimpleNamespace

    pike = PiKE(check_interval=10)
    pike.mixture = SimpleNamespace(num_domains=3)
    state = SimpleNamespace(timestamp=SimpleNamespace(batch=10))
    assert pike.match(Event.BEFORE_TRAIN_BATCH, state)
    pike._pending = ('statistics', 'domains', 'losses')  # probed; the batch then fails and is retried
    assert not pike.match(Event.BEFORE_TRAIN_BATCH, state)
    assert pike.match(Event.BATCH_END, state)

def test_a_trainer_past_the_end_of_a_stop_mixture_stops_at_the_last_batch(dataset):
    """A Composer Trainer with no mixture callback used to start empty epochs for ever after the last
    batch of an on_exhausted='stop' mixture; the loader now stops it at that batch, with or without MixtureMonitor."""
    from composer_pike.callbacks import MixtureMonitor
    stop = dict(on_exhausted='stop', weights=[0.2, 0.2, 0.6])  # domain 2 (40 samples) ends first
    plain = fit(dataset, max_duration='1000ba', loader_kwargs=stop)
    monitored = fit(dataset, max_duration='1000ba', loader_kwargs=stop, callbacks=[MixtureMonitor()])
    for run in (plain, monitored):
        assert run.loader.dataset.finished
        assert int(run.trainer.state.timestamp.batch) == len(run.recorder.rows) == 40 // 5
        assert int(run.trainer.state.timestamp.epoch) <= 1  # no empty epochs


def test_checks_start_one_interval_in_by_default_and_the_first_probes_every_domain(dataset):
    """The default first check comes after one interval, not on the untrained model; with one domain per
    check it still measures all of them (at one time), then the least recently probed goes next."""
    interval = 3
    run = fit(dataset, algorithms=[make_pike(check_interval=interval, first_check=None, domains_per_check=1)],
              max_duration='13ba', num_workers=0)
    assert [b for b, _ in run.series['pike/checks']] == [4, 7, 10, 13]  # checks before batches 3, 6, 9, 12
    assert run.values('pike/probed_domains') == [len(NAMES), 1.0, 1.0, 1.0]
    first_probe = [[b for b, _ in run.series[f'pike/grad_sq_norm/{n}']][0] for n in NAMES]
    assert first_probe == [4] * len(NAMES)
    later = [[b for b, _ in run.series[f'pike/grad_sq_norm/{n}']][1:] for n in NAMES]
    assert later == [[7], [10], [13]]  # rotation by least recently probed, ties by index


def test_metrics_at_every_check_and_counts_change_at_effective_step(dataset):
    num_batches, interval = 16, 4
    run = fit(dataset, algorithms=[make_pike(check_interval=interval)], max_duration=f'{num_batches}ba', num_workers=2)
    series, delay = run.series, run.loader.batch_sampler.delay
    assert delay == loader_lookahead(2, 2) == 4
    checks = list(range(0, num_batches, interval))
    logged_at = [c + 1 for c in checks]  # BATCH_END of the check step: timestamp.batch is already c + 1

    names = [f'pike/{kind}/{n}' for kind in PER_DOMAIN for n in NAMES]
    names += ['pike/zeta_ratio', 'pike/critical_z', 'pike/skipped', 'pike/checks', 'pike/probe_samples',
              'pike/probed_domains', 'pike/effective_step', 'pike/min_cosine']
    names += [f'pike/{kind}/{a}/{b}' for kind in ('cosine', 'cosine_se') for i, a in enumerate(NAMES) for b in NAMES[i + 1:]]
    for name in names:
        assert [b for b, _ in series.get(name, [])] == logged_at, name
    for n in NAMES:  # a probe's distance from its pool, from the second probe on
        assert [b for b, _ in series[f'pike/drift_z/{n}']] == logged_at[1:], n
        assert all(value >= 0 for _, value in series[f'pike/drift_z/{n}'])
    assert run.values('pike/checks') == [1.0, 2.0, 3.0, 4.0]
    assert run.values('pike/skipped') == [0.0] * len(checks)
    assert run.values('pike/probe_samples') == [16.0 * len(NAMES) * (i + 1) for i in range(len(checks))]
    assert all(0 < rho < 1 for rho in run.values('pike/zeta_ratio'))
    for i, b in enumerate(logged_at):
        at = {kind: np.array([dict(series[f'pike/{kind}/{n}'])[b] for n in NAMES]) for kind in PER_DOMAIN}
        assert at['weight'].sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(at['weight'] >= default_min_weight(len(NAMES), BATCH_SIZE) - 1e-12)  # a sample per batch
        assert np.all(np.isfinite(at['grad_sq_norm'])) and np.all(at['variance'] > 0)
        assert np.all((at['probe_loss'] > 0) & (at['probe_loss'] < 20))
        assert np.all(at['grad_sq_norm_se'] > 0) and np.all(at['variance_se'] > 0)
        assert np.all(at['pooled/samples'] >= 16)
        positive = at['pooled/grad_sq_norm'] > 0
        np.testing.assert_allclose(at['noise_scale'][positive],
                                   at['pooled/variance'][positive] / at['pooled/grad_sq_norm'][positive], rtol=1e-12)
        if i == 0:  # the first probe is the whole pool
            for kind in ('grad_sq_norm', 'grad_sq_norm_se', 'variance', 'variance_se', 'probe_loss'):
                np.testing.assert_allclose(at[f'pooled/{kind}'], at[kind], rtol=1e-12)
        for a_i, a in enumerate(NAMES):
            for b_name in NAMES[a_i + 1:]:
                assert math.isfinite(dict(series[f'pike/cosine/{a}/{b_name}'])[b])
                assert dict(series[f'pike/cosine_se/{a}/{b_name}'])[b] > 0

    # Effective-step rule: decided after step c, used from c + 1 + delay on.
    effective = [int(v) for v in run.values('pike/effective_step')]
    assert effective == [c + 1 + delay for c in checks]

    # The loader's counts follow exactly the logged schedule, step by step.
    counts = step_counts(run.recorder)
    assert sorted(counts) == list(range(num_batches))
    expected = expected_counts(series, range(num_batches))
    for step in range(num_batches):
        np.testing.assert_array_equal(counts[step], expected[step], err_msg=f'step {step}')
        assert counts[step].sum() == BATCH_SIZE and np.all(counts[step] >= 1)
    changes = [s for s in range(1, num_batches) if not np.array_equal(counts[s], counts[s - 1])]
    assert changes, 'weights never changed the batch counts: the test is too weak'
    assert set(changes) <= set(effective), (changes, effective)
    # The logged batch counts are those of the batch at the effective step.
    for b, e in zip(logged_at, effective):
        if e < num_batches:
            assert [dict(series[f'pike/batch_count/{n}'])[b] for n in NAMES] == counts[e].tolist()

    # Epochs: samples of each domain the trainer consumed up to and including the check step.
    for c, b in zip(checks, logged_at):
        consumed = sum(counts[s] for s in range(c + 1))
        logged = np.array([dict(series[f'pike/epochs/{n}'])[b] for n in NAMES])
        np.testing.assert_allclose(logged, consumed / np.array(DOMAIN_SIZES), rtol=1e-12)

    # The algorithm attached to the mixture loader at FIT_START.
    algorithm = run.trainer.state.algorithms[0]
    assert algorithm.mixture is run.loader.dataset


# --------------------------------------------------------------------------------------------- 2. probe vs training


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_probe_does_not_change_training(dataset, monkeypatch, dropout):
    """PiKE probing every other step, with its update overridden to reschedule the same uniform weights,
    trains exactly like no PiKE at all: the probe's gradients are wiped by the trainer's zero_grad, its
    samples are read without moving the loader and (with dropout) its random draws must not shift
    training's."""
    uniform = np.full(len(NAMES), 1 / len(NAMES))

    def same_weights(*args, **kwargs):
        step = apply_scores(*args, **kwargs)
        return dataclasses.replace(step, weights=uniform.copy(), log_weights=np.log(uniform))

    monkeypatch.setattr(algorithm_module, 'apply_scores', same_weights)
    with_pike = fit(dataset, model=build_model(dropout=dropout), algorithms=[make_pike(check_interval=2)],
                    max_duration='6ba')
    without = fit(dataset, model=build_model(dropout=dropout), max_duration='6ba')
    assert with_pike.values('pike/checks') == [1.0, 2.0, 3.0]  # it did probe ...
    assert [int(v) for v in with_pike.values('pike/effective_step')] == [1, 3, 5]  # ... and schedule
    assert with_pike.recorder.rows == without.recorder.rows
    for name, param in without.params.items():
        assert torch.equal(with_pike.params[name], param), name


# --------------------------------------------------------------------------------------------- 3. microbatching, bf16, clipping


def test_microbatching_gives_the_same_statistics(dataset, reference):
    ref = reference.stats_at_first_check()
    # Training microbatches of 2 and, by default, probe microbatches of 2 (< the per-rank chunk of 4).
    sizes = ForwardSizes()
    model = build_model()
    sizes.attach(model)
    micro = fit(dataset, model=model, algorithms=[make_pike(check_interval=1)],
                callbacks=[sizes], max_duration='2ba', device_train_microbatch_size=2)
    assert set(sizes.probe) == {2} and len(sizes.probe) == 2 * len(NAMES) * 16 // 2
    assert set(sizes.training) == {2}
    # Whole-batch training, probe microbatches of 3 that do not divide the chunk of 4 (3 + 1).
    sizes_uneven = ForwardSizes()
    model = build_model()
    sizes_uneven.attach(model)
    uneven = fit(dataset, model=model, callbacks=[sizes_uneven], max_duration='2ba',
                 algorithms=[make_pike(check_interval=1, probe_microbatch_size=3)])
    assert sorted(set(sizes_uneven.probe)) == [1, 3]
    for run in (micro, uneven):
        got = run.stats_at_first_check()
        for kind in ('grad_sq_norm', 'variance', 'probe_loss', 'weight'):
            np.testing.assert_allclose(got[kind], ref[kind], rtol=1e-4, err_msg=kind)
        # After one (microbatched) training step the second check still agrees closely.
        for n in NAMES:
            np.testing.assert_allclose(run.series[f'pike/grad_sq_norm/{n}'][1][1],
                                       reference.series[f'pike/grad_sq_norm/{n}'][1][1], rtol=1e-3)


def test_amp_bf16_is_refused_on_cpu_by_composer(dataset):
    """Composer 0.32.1 itself rejects amp_bf16 on CPU (composer.core.precision._validate_precision)."""
    model = build_model()
    with pytest.raises(ValueError, match='not supported for CPU'):
        Trainer(model=model, train_dataloader=build_loader(dataset), max_duration='1ba', device='cpu',
                precision='amp_bf16', algorithms=[make_pike()], progress_bar=False)


def test_bf16_autocast_probe_gives_finite_statistics(dataset, reference, monkeypatch):
    """amp_bf16 emulated on CPU: Composer's precision context (training and probe) becomes a CPU
    bfloat16 autocast, as it is a CUDA bfloat16 autocast on GPUs."""
    @contextlib.contextmanager
    def bf16_context(precision, precision_config=None, fp8_autocast_enabled=True):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            yield

    import composer.trainer.trainer as trainer_module
    monkeypatch.setattr(trainer_module, 'get_precision_context', bf16_context)
    monkeypatch.setattr(probe_module, 'get_precision_context', bf16_context)
    sizes = ForwardSizes()
    model = build_model()
    sizes.attach(model)
    run = fit(dataset, model=model, callbacks=[sizes], max_duration='4ba',
              algorithms=[make_pike(check_interval=2)])
    assert sizes.logits_dtypes == {torch.bfloat16}  # the probe really ran under autocast
    assert run.values('pike/skipped') == [0.0, 0.0]
    for key, values in run.series.items():
        assert all(math.isfinite(v) for _, v in values), key
    got, ref = run.stats_at_first_check(), reference.stats_at_first_check()
    np.testing.assert_allclose(got['grad_sq_norm'], ref['grad_sq_norm'], rtol=0.1)  # bf16 noise only
    assert all(torch.isfinite(p).all() for p in run.params.values())


def test_gradient_clipping_alongside_pike(dataset, reference):
    from composer.algorithms import GradientClipping

    threshold = 1e-3

    class GradNorm(Callback):
        def __init__(self) -> None:
            self.norms: list[float] = []

        def run_event(self, event, state, logger):
            if event == Event.AFTER_TRAIN_BATCH:  # after the algorithms, i.e. after clipping
                grads = [p.grad for p in state.model.parameters() if p.grad is not None]
                self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    grad_norm = GradNorm()
    run = fit(dataset, callbacks=[grad_norm], max_duration='2ba',
              algorithms=[GradientClipping(clipping_type='norm', clipping_threshold=threshold),
                          make_pike(check_interval=1)])
    assert len(grad_norm.norms) == 2 and max(grad_norm.norms) <= threshold * (1 + 1e-4)  # clipping was active
    # The probe reads raw gradients: the first check equals the unclipped reference exactly.
    got, ref = run.stats_at_first_check(), reference.stats_at_first_check()
    for kind in ('grad_sq_norm', 'variance', 'weight'):
        np.testing.assert_array_equal(got[kind], ref[kind])
    assert run.values('pike/skipped') == [0.0, 0.0]


# --------------------------------------------------------------------------------------------- 4. resume


def test_resume_mid_training_reproduces_the_uninterrupted_run(dataset, data_template, tmp_path):
    total, cut, interval = 16, 8, 3
    pike = dict(check_interval=interval)
    full = fit(dataset, algorithms=[make_pike(**pike)], max_duration=f'{total}ba',
               num_workers=2)
    ckpt = tmp_path / 'ckpt'
    first = fit(dataset, algorithms=[make_pike(**pike)], max_duration=f'{cut}ba',
                num_workers=2, save_folder=str(ckpt), save_interval=f'{cut}ba',
                save_filename='ep{epoch}-ba{batch}-rank{rank}.pt')
    checkpoint = ckpt / f'ep0-ba{cut}-rank0.pt'
    assert checkpoint.is_file(), sorted(os.listdir(ckpt))
    # A new model (different init), new datasets and loader, new algorithm object.
    resumed = fit(copy_data(data_template, tmp_path / 'c'), model=build_model(seed=1234),
                  algorithms=[make_pike(**pike)], max_duration=f'{total}ba', num_workers=2, load_path=str(checkpoint))

    state = resumed.trainer.state
    assert state.dataset_resumption.get('train') is True  # the dataset state was loaded: no dataloader spinning
    assert sorted(resumed.recorder.rows) == list(range(cut, total))
    for step in range(cut, total):
        assert resumed.recorder.rows[step] == full.recorder.rows[step], f'step {step}'
        assert resumed.recorder.schedules[step] == full.recorder.schedules[step], f'step {step}'
    assert first.recorder.rows == {s: full.recorder.rows[s] for s in range(cut)}
    # The PiKE trajectory after the cut is identical, including the restored pooled statistics and check count.
    for key, values in full.series.items():
        before = [(b, v) for b, v in values if b <= cut]
        after = [(b, v) for b, v in values if b > cut]
        assert first.series.get(key, []) == before, key
        assert resumed.series.get(key, []) == after, key
    assert resumed.values('pike/checks')[0] == 1 + len(range(0, cut, interval))
    for name, param in full.params.items():
        torch.testing.assert_close(resumed.params[name], param, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------------------------- 5. two processes




@pytest.fixture(scope='module')
def two_process_results(data_template, tmp_path_factory) -> dict[str, list[dict]]:
    """One `composer -n 2` launch running algorithm_worker.py for FSDP2 and then DDP."""
    root = tmp_path_factory.mktemp('two_process')
    out, data = root / 'out', root / 'data'
    out.mkdir()
    modes = ('fsdp2', 'ddp')
    for mode in modes:
        copy_data(data_template, data / mode)
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR',
                        'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', TOKENIZERS_PARALLELISM='false',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get('PYTHONPATH')])))
    command = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(free_port()),
               str(WORKER), str(out), str(data), *modes]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert completed.returncode == 0, (completed.stdout[-3000:] + completed.stderr[-6000:])
    return {mode: [json.loads((out / f'{mode}-rank{r}.json').read_text()) for r in range(2)] for mode in modes}


@pytest.mark.parametrize('mode', ['fsdp2', 'ddp'])
def test_two_processes_ranks_agree(two_process_results, mode):
    rank0, rank1 = two_process_results[mode]
    assert rank0['world_size'] == rank1['world_size'] == 2
    if mode == 'fsdp2':
        assert rank0['param_types'] == ['DTensor']  # really sharded with FSDP2
    else:
        assert rank0['model_type'] == 'DistributedDataParallel'
    num_batches, interval = worker.NUM_BATCHES, worker.CHECK_INTERVAL
    # Identical statistics and weights, bit for bit, after every update and every step.
    assert rank0['metrics'] == rank1['metrics']
    assert rank0['schedules'] == rank1['schedules']
    assert rank0['digests'] == rank1['digests']  # identical full model parameters after every step
    series = {k: [tuple(x) for x in v] for k, v in rank0['metrics'].items()}
    checks = list(range(0, num_batches, interval))
    assert [b for b, _ in series['pike/weight/d0']] == [c + 1 for c in checks]
    assert [int(v) for _, v in series['pike/effective_step']] == [c + 1 + rank0['delay'] for c in checks]
    for b, _ in series['pike/weight/d0']:
        assert sum(dict(series[f'pike/weight/{n}'])[b] for n in NAMES) == pytest.approx(1.0, abs=1e-12)
    # The ranks train on disjoint halves of one global batch whose counts follow the schedule.
    expected = expected_counts(series, range(num_batches))
    for step in range(num_batches):
        rows0, rows1 = rank0['rows'][str(step)], rank1['rows'][str(step)]
        assert len(rows0) == len(rows1) == BATCH_SIZE // 2
        assert not {tuple(r) for r in rows0} & {tuple(r) for r in rows1}
        counts = np.bincount([d for d, _ in rows0 + rows1], minlength=len(NAMES))
        np.testing.assert_array_equal(counts, expected[step], err_msg=f'step {step}')


def test_two_processes_statistics_match_single_process(two_process_results, reference):
    """At the first check (same init, same probe samples) two ranks give one process's G, sigma^2 and loss.

    Each rank takes its slice of every global chunk (MixtureDataset.probe_batch), so the chunks,
    hence the unbiased estimates, are those of one process, up to fp32 reduction order. FSDP2's
    gradient reduce-scatter sums instead of averaging on gloo (pytorch/pytorch#162338), which
    would make G and sigma^2 world_size^2 = 4 times too large; the probe divides its loss by
    ``gradient_sum_factor`` (2 for FSDP2 here, 1 for DDP), so no factor may remain.
    """
    ref = reference.stats_at_first_check()
    for mode in ('fsdp2', 'ddp'):
        got = {kind: np.array([two_process_results[mode][0]['metrics'][f'pike/{kind}/{n}'][0][1] for n in NAMES])
               for kind in ('grad_sq_norm', 'variance', 'probe_loss', 'weight')}
        for kind, rtol in (('grad_sq_norm', 1e-4), ('variance', 1e-4), ('probe_loss', 1e-5), ('weight', 1e-4)):
            np.testing.assert_allclose(got[kind], ref[kind], rtol=rtol, err_msg=f'{mode} {kind}')


def test_mixture_loader_is_accepted_by_composer_with_two_ranks(dataset, monkeypatch):
    """Composer's DataSpec refuses a map-style train loader on more than one rank unless its sampler or
    batch sampler is a DistributedSampler ("does not use DistributedSampler"), so `composer -n 2` with
    PiKE fails in Trainer.__init__. (algorithm_worker.py patches the sampler's type so that the
    two-process tests above can run; this test has no such patch.)"""
    from composer.core.data_spec import ensure_data_spec
    from composer.utils import dist

    loader = build_loader(dataset, rank=0, world_size=2)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    ensure_data_spec(loader)


# --------------------------------------------------------------------------------------------- 6. bad input


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_chunks=1), 'num_chunks'),
    (dict(check_interval=0), 'check_interval'),
    (dict(check_interval=-3), 'check_interval'),
    (dict(update='paper', zeta1=0.0, zeta2=1.0), 'zeta1'),
    (dict(update='paper', zeta1=-1.0, zeta2=1.0), 'zeta1'),
    (dict(update='paper', zeta1=1.0, zeta2=0.0), 'zeta2'),
    (dict(update='paper', zeta1=1.0), 'both'),
    (dict(update='paper'), "update='paper', which needs them"),
    (dict(zeta1=1.0, zeta2=1.0), "update='paper', which needs them"),
    (dict(update='sometimes'), 'update must be one of evidence, paper, kkt'),
    (dict(estimation_batch_size=10, num_chunks=4), 'multiple'),
    (dict(tau=-1.0), 'tau'),
    (dict(step_size=0.0), 'step_size'),
    (dict(evidence_z=-1.0), 'evidence_z'),
    (dict(zeta_ratio='often'), 'zeta_ratio'),
    (dict(smoothness=-1.0), 'smoothness'),
    (dict(pool_decay=1.0), 'pool_decay'),
    (dict(domains_per_check=0), 'domains_per_check'),
    (dict(alignment=True, update='kkt'), "alignment=True is an option of update='evidence'"),
    (dict(alignment=True, conflict_sketch_size=0), 'alignment=True needs the gradient sketch'),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PiKE(**kwargs)


def test_single_domain_warns_and_does_nothing(tmp_path):
    sizes = ForwardSizes()
    model = build_model()
    sizes.attach(model)
    single = write_data(tmp_path / 'single', sizes=(40,))
    with pytest.warns(UserWarning, match='one domain'):
        run = fit(single, model=model, callbacks=[sizes], algorithms=[make_pike(check_interval=1)],
                  max_duration='3ba')
    assert run.series == {}  # nothing logged
    assert sizes.probe == [] and len(sizes.training) == 3  # no probe passes
    assert len(run.loader.batch_sampler.planner.schedule) == 1  # no weights scheduled
    assert all(d == 0 for rows in run.recorder.rows.values() for d, _ in rows)


@pytest.mark.parametrize('make_algorithm, name', [(make_pike, 'PiKE'), (LossSlope, 'loss-slope mixing')])
def test_plain_dataloader_is_a_clear_type_error(make_algorithm, name):
    tokens = torch.randint(0, worker.VOCAB_SIZE, (16, worker.SEQ_LEN))
    samples = [{'input_ids': t, 'labels': t} for t in tokens]
    loader = torch.utils.data.DataLoader(samples, batch_size=4)
    model = build_model()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='1ba', algorithms=[make_algorithm()],
                      device='cpu', progress_bar=False)
    with pytest.raises(TypeError, match=f'^{name} needs the train dataloader from .*build_mixture_dataloader'):
        trainer.fit()
    trainer.close()


def test_unattached_mixture_dataset_is_a_clear_type_error(dataset, monkeypatch):
    monkeypatch.setattr(dataset, 'sampler', None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    trainer = Trainer(model=build_model(), train_dataloader=loader, max_duration='1ba', algorithms=[make_pike()],
                      device='cpu', progress_bar=False)
    with pytest.raises(TypeError, match='build_mixture_dataloader'):
        trainer.fit()
    trainer.close()


def nan_model(domain: int = 1):
    """The tiny model whose loss is NaN on batches made only of ``domain`` (the probe's batches of that
    domain; every training batch mixes all domains)."""
    model = build_model()

    def loss(outputs, batch, original=model.loss):
        value = original(outputs, batch)
        return value * math.nan if bool((batch['domain'] == domain).all()) else value

    model.loss = loss
    return model


PAPER = dict(update='paper', zeta1=0.5, zeta2=0.5)


@pytest.mark.parametrize('rule', [{}, PAPER], ids=['evidence', 'paper'])
def test_non_finite_statistics_skip_the_update(dataset, caplog, rule):
    with caplog.at_level(logging.WARNING, logger='composer_pike.algorithms.pike'):
        run = fit(dataset, model=nan_model(), algorithms=[make_pike(check_interval=2, **rule)], max_duration='4ba')
    messages = [r.getMessage() for r in caplog.records if r.name == 'composer_pike.algorithms.pike']
    assert len([m for m in messages if 'skipping' in m]) == 2, messages
    assert any("non-finite statistics or probe loss for ['d1']" in m for m in messages), messages
    assert 'pike/effective_step' not in run.series  # nothing scheduled
    assert len(run.loader.batch_sampler.planner.schedule) == 1
    assert all(np.array_equal(c, [3, 3, 2]) for c in step_counts(run.recorder).values())
    assert all(torch.isfinite(p).all() for p in run.params.values())  # training never saw the NaN
    assert run.values('pike/skipped') == [1.0, 1.0]  # the skip is visible in the metrics too
    assert 'pike/pooled/grad_sq_norm/d1' not in run.series  # the NaN probe was never pooled
    assert all(math.isfinite(v) for v in run.values('pike/pooled/grad_sq_norm/d0'))
    for n in NAMES:
        assert run.values(f'pike/weight/{n}') == pytest.approx([1 / len(NAMES)] * 2, abs=1e-12)


def test_non_finite_probe_loss_with_balanced_pike_skips(dataset, caplog):
    with caplog.at_level(logging.WARNING, logger='composer_pike.algorithms.pike'):
        run = fit(dataset, model=nan_model(), max_duration='2ba', algorithms=[make_pike(check_interval=2, tau=3.0)])
    assert run.values('pike/skipped') == [1.0]
    assert any('non-finite' in r.getMessage() for r in caplog.records), caplog.text
    assert len(run.loader.batch_sampler.planner.schedule) == 1


def logged(run: Run, kinds, check: int) -> dict[str, np.ndarray]:
    return {kind: np.array([run.series[f'pike/{kind}/{n}'][check][1] for n in NAMES]) for kind in kinds}


def test_evidence_updates_follow_the_logged_statistics(dataset, monkeypatch):
    """Each check's weights are apply_scores of the logged scores from the previous weights, and each score
    is step_size times the advantage beyond critical_z standard errors, clipped (weights.evidence_scores),
    which PiKE feeds the pooled statistics, the weights in force and the logged zeta ratio."""
    calls = []

    def recording(*args, **kwargs):
        result = evidence_scores(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(algorithm_module, 'evidence_scores', recording)
    run = fit(dataset, algorithms=[make_pike(check_interval=2, evidence_z=1.0)], max_duration='8ba')
    algorithm = run.trainer.state.algorithms[0]
    log_weights = np.log(np.full(len(NAMES), 1 / len(NAMES)))
    moved = 0
    for check, critical in enumerate(run.values('pike/critical_z')):
        at = logged(run, ('advantage', 'advantage_se', 'score', 'weight'), check)
        assert critical > 1.0  # small-sample correction: the noise shape rests on a few probes
        excess = np.maximum(np.abs(at['advantage']) - critical * at['advantage_se'], 0.0)
        expected = np.clip(algorithm.step_size * np.sign(at['advantage']) * excess, -1.0, 1.0)
        np.testing.assert_allclose(at['score'], expected, rtol=1e-9, atol=1e-15)
        step = apply_scores(log_weights, at['score'], min_weight=default_min_weight(len(NAMES), BATCH_SIZE))
        np.testing.assert_allclose(at['weight'], step.weights, rtol=1e-10)
        log_weights = step.log_weights
        moved += bool(np.any(at['score'] != 0))
    assert moved  # the test saw at least one update that moved
    assert len(calls) == len(run.values('pike/critical_z'))
    weights = np.full(len(NAMES), 1 / len(NAMES))
    for check, ((grad, variance, grad_var, *_rest), options, result) in enumerate(calls):
        at = logged(run, ('pooled/grad_sq_norm', 'pooled/grad_sq_norm_se', 'pooled/variance', 'advantage',
                          'weight'), check)
        np.testing.assert_allclose(grad, at['pooled/grad_sq_norm'], rtol=1e-12)  # pooled, not this probe's
        np.testing.assert_allclose(np.sqrt(grad_var), at['pooled/grad_sq_norm_se'], rtol=1e-12)
        np.testing.assert_allclose(variance, at['pooled/variance'], rtol=1e-12)
        np.testing.assert_allclose(_rest[-1], weights, rtol=1e-12)  # the weights in force before the check
        assert options['zeta_ratio'] == run.values('pike/zeta_ratio')[check]
        assert options['batch_size'] == BATCH_SIZE and options['evidence_z'] == 1.0
        assert 'inner_products' in options  # the alignment terms are on by default
        np.testing.assert_allclose(result.advantage, at['advantage'], rtol=1e-12)
        weights = at['weight']


@pytest.mark.parametrize('max_duration', ['16ba', '128sp'])
def test_max_epochs_per_domain_caps_the_weights_by_the_samples_left(dataset, max_duration):
    """``max_epochs_per_domain=1`` over domains of 60, 50 and 40 samples and 16 batches of 8: a weight may not
    exceed (one pass - samples consumed) / samples left in the run, whatever unit max_duration is in. The
    40-sample domain's cap is below 1/3 from the first check on, so the cap binds with no evidence at all."""
    run = fit(dataset, algorithms=[make_pike(check_interval=2, max_epochs_per_domain=1.0)], max_duration=max_duration)
    checks = [batch for batch, _ in run.series['pike/weight/d0']]
    assert checks == [1, 3, 5, 7, 9, 11, 13, 15]  # logged at BATCH_END of batches 0, 2, ... (first_check=0)
    for check, batch in enumerate(checks):
        at = logged(run, ('weight', 'epochs'), check)
        remaining = (16 - batch) * BATCH_SIZE
        cap = epoch_cap_upper_bounds(DOMAIN_SIZES, remaining, 1.0,
                                     samples_consumed=at['epochs'] * np.array(DOMAIN_SIZES))
        assert np.all(at['weight'] <= np.minimum(cap, 1.0) + 1e-12), (batch, at['weight'], cap)
        assert at['weight'].sum() == pytest.approx(1.0)
    first = logged(run, ('weight',), 0)['weight']
    assert first[2] < 1 / 3 - 0.01  # (40 - its 2 samples of the first batch) / 120 samples left = 0.317


def test_mixture_monitor_logs_the_next_batch_and_the_samples_consumed(dataset):
    """MixtureMonitor at step s (batches 0..s-1 trained): the weights and counts of batch s, as the trainer
    then received it, and the passes over each domain that batches 0..s-1 made."""
    from composer_pike.callbacks import MixtureMonitor

    run = fit(dataset, algorithms=[make_pike(check_interval=2)], callbacks=[MixtureMonitor(interval=2)])
    counts = step_counts(run.recorder)
    steps = [step for step, _ in run.series['mixture/weight/d0']]
    assert steps == [1, 2, 4, 6, 8]
    moved = False
    for step in steps:
        at = {kind: np.array([dict(run.series[f'mixture/{kind}/{n}'])[step] for n in NAMES])
              for kind in ('weight', 'batch_count', 'epochs')}
        consumed = sum(counts[s] for s in range(step))
        np.testing.assert_allclose(at['epochs'], consumed / np.array(DOMAIN_SIZES), rtol=1e-12)
        if step < 8:  # the last step has no next batch
            assert at['batch_count'].tolist() == counts[step].tolist()
            assert apportion(at['weight'], BATCH_SIZE, min_count=1).tolist() == counts[step].tolist()
        moved |= not np.allclose(at['weight'], 1 / len(NAMES))
    assert moved  # the monitor followed PiKE's changes, not only the initial weights


def test_alignment_terms_come_from_the_pooled_inner_products(dataset, reference):
    """The default (alignment on with update='evidence'): each check logs the pooled inner products of every
    pair and, per domain, alignment_terms of them; the probe is the same as without (same G's), the
    advantages differ."""
    from composer_pike.weights import alignment_terms

    assert PiKE().alignment and not PiKE(update='kkt').alignment and not PiKE(conflict_sketch_size=0).alignment
    run = reference
    plain = fit(dataset, algorithms=[make_pike(check_interval=1, alignment=False)], max_duration='2ba')
    np.testing.assert_allclose(logged(run, ('grad_sq_norm',), 0)['grad_sq_norm'],
                               plain.stats_at_first_check()['grad_sq_norm'], rtol=1e-9)
    for check in range(2):
        inner, inner_var = np.zeros((len(NAMES),) * 2), np.zeros((len(NAMES),) * 2)
        for j, a in enumerate(NAMES):
            for k in range(j + 1, len(NAMES)):
                inner[j, k] = inner[k, j] = run.series[f'pike/pooled/inner_product/{a}/{NAMES[k]}'][check][1]
                se = run.series[f'pike/pooled/inner_product_se/{a}/{NAMES[k]}'][check][1]
                inner_var[j, k] = inner_var[k, j] = se**2
        terms, terms_var = alignment_terms(inner, inner_var, np.ones(len(NAMES)), np.ones(len(NAMES), dtype=bool))
        at = logged(run, ('alignment', 'alignment_se'), check)
        np.testing.assert_allclose(at['alignment'], terms, rtol=1e-9)
        np.testing.assert_allclose(at['alignment_se'], np.sqrt(terms_var), rtol=1e-9)
    assert not np.allclose(logged(run, ('advantage',), 0)['advantage'], logged(plain, ('advantage',), 0)['advantage'])


def test_paper_mode_is_algorithm_1_on_pooled_statistics(dataset):
    """update='paper' is pike_update with the explicit zetas, cumulative, on the pooled G and sigma^2."""
    run = fit(dataset, algorithms=[make_pike(check_interval=2, **PAPER)], max_duration='6ba')
    assert run.values('pike/zeta1') == [0.5] * 3 and run.values('pike/zeta2') == [0.5] * 3  # never recalibrated
    log_weights = np.log(np.full(len(NAMES), 1 / len(NAMES)))
    for check in range(3):
        at = logged(run, ('pooled/grad_sq_norm', 'pooled/variance', 'weight'), check)
        step = pike_update(log_weights, at['pooled/grad_sq_norm'], at['pooled/variance'], zeta1=0.5, zeta2=0.5,
                           batch_size=BATCH_SIZE)
        np.testing.assert_allclose(at['weight'], step.weights, rtol=1e-10)
        log_weights = step.log_weights


def test_kkt_mode_is_the_bound_minimiser_at_the_current_learning_rate(dataset):
    """update='kkt' (mixing.policy=pike_kkt): the logged weights are kkt_weights of the pooled statistics
    with L = zeta_ratio / lr (smoothness 'auto'), projected onto the floor."""
    from composer_pike.weights import kkt_weights, project_to_bounds

    run = fit(dataset, algorithms=[make_pike(check_interval=2, update='kkt')], max_duration='4ba')
    floor = default_min_weight(len(NAMES), BATCH_SIZE)
    lr = 1e-3  # fit's AdamW, no scheduler
    for check, rho in enumerate(run.values('pike/zeta_ratio')):
        at = logged(run, ('pooled/grad_sq_norm', 'pooled/variance', 'weight'), check)
        optimum = kkt_weights(at['pooled/grad_sq_norm'], at['pooled/variance'], lr=lr, batch_size=BATCH_SIZE,
                              smoothness=rho / lr)
        np.testing.assert_allclose(at['weight'], project_to_bounds(optimum, floor, 1.0), rtol=1e-9)


# --------------------------------------------------------------------------------------------- 7. Balanced-PiKE


def test_balanced_pike_differs_from_plain_and_matches_the_math(dataset, reference):
    plain = fit(dataset, algorithms=[make_pike(check_interval=1, **PAPER)], max_duration='1ba')
    balanced = fit(dataset, algorithms=[make_pike(check_interval=1, tau=3.0, **PAPER)], max_duration='1ba')
    plain_stats, tilted = plain.stats_at_first_check(), balanced.stats_at_first_check()
    for kind in ('grad_sq_norm', 'variance', 'probe_loss'):
        np.testing.assert_array_equal(tilted[kind], plain_stats[kind])  # same statistics ...
    assert np.abs(tilted['weight'] - plain_stats['weight']).max() > 1e-3  # ... different weights
    # Both runs are exactly one PiKE step of composer_pike.weights on the logged statistics from uniform weights.
    uniform = np.log(np.full(len(NAMES), 1 / len(NAMES)))
    for stats, tau in ((plain_stats, 0.0), (tilted, 3.0)):
        loss_weights = balanced_coefficients(stats['probe_loss'], tau) if tau > 0 else None
        step = pike_update(uniform, stats['grad_sq_norm'], stats['variance'], zeta1=0.5, zeta2=0.5,
                           batch_size=BATCH_SIZE, loss_weights=loss_weights)
        np.testing.assert_allclose(stats['weight'], step.weights, rtol=1e-12)
    # The tilt favours the domain with the highest probe loss relative to plain PiKE.
    worst = int(np.argmax(plain_stats['probe_loss']))
    assert tilted['weight'][worst] / plain_stats['weight'][worst] == max(tilted['weight'] / plain_stats['weight'])


def test_conflicts_are_reported_only_when_the_interval_lies_below_the_threshold():
    names = ['a', 'b', 'c', 'd']
    nan = math.nan
    cosines = np.array([[1.0, -0.6, -0.6, nan],
                        [-0.6, 1.0, 0.3, nan],
                        [-0.6, 0.3, 1.0, nan],
                        [nan, nan, nan, 1.0]])
    se = np.array([[0.0, 0.1, 0.3, nan],  # a-b: -0.6 + 1.96 * 0.1 < -0.2; a-c: the interval reaches -0.01
                   [0.1, 0.0, 0.05, nan],
                   [0.3, 0.05, 0.0, nan],
                   [nan, nan, nan, 0.0]])
    metrics, conflicts = conflict_report(names, cosines, se, threshold=-0.2)
    assert conflicts == ["gradients of 'a' and 'b' conflict (cosine -0.600 +- 0.196, 95% interval below -0.200)"]
    assert metrics['pike/cosine/a/c'] == -0.6 and metrics['pike/cosine_se/a/c'] == 0.3
    assert math.isnan(metrics['pike/cosine/a/d'])  # logged, never reported, not the minimum
    assert metrics['pike/min_cosine'] == -0.6
    assert len([k for k in metrics if k.startswith('pike/cosine/')]) == 6
    _, none = conflict_report(names, cosines, se, threshold=-0.7)
    assert none == []
