"""The YAML training entry point: schema validation, the shipped yamls, policies, loggers, end-to-end runs,
autoresume from a local folder and from s3:// (moto), and two FSDP2 processes through the composer launcher."""
import dataclasses
import glob
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from composer import Callback
from mds_helpers import write_domain

from composer_pike.algorithms import LossSlope, PiKE
from composer_pike.policies import POLICIES, plan_policy, temperature_weights
from composer_pike.train import (ConfigError, LossSlopeConfig, PiKEConfig, build_loggers, build_model, check_machine,
                                 load_config, loss_slope_options, main, pike_options, train)
from launch_helpers import free_port
from test_data import with_private_shm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_YAML = os.path.join(REPO, 'yamls', 'demo_cpu.yaml')
MULTILINGUAL_YAML = os.path.join(REPO, 'yamls', 'multilingual_gpt2_small.yaml')
GLAM_YAML = os.path.join(REPO, 'yamls', 'six_domain_glam.yaml')
YAMLS = sorted(glob.glob(os.path.join(REPO, 'yamls', '*.yaml')))
DOMAINS = ('d0', 'd1', 'd2')
TOTAL, CUT, CRASH = 8, 4, 6  # steps; checkpoints every CUT steps; the interrupted run dies after step CRASH
# evidence_z=0: weights move at every check, so resumption and rank agreement are tested on moving weights
TINY = ['data.global_batch_size=8', 'data.num_workers=2', 'data.eval_batch_size=4', 'data.eval_max_batches=2',
        'model.d_model=32', 'model.n_heads=2', 'mixing.pike.check_interval=2',
        'mixing.pike.estimation_batch_size=8', 'mixing.pike.num_chunks=2', 'mixing.pike.evidence_z=0', 'trainer.progress_bar=false', f'trainer.max_duration={TOTAL}ba',
        f'trainer.eval_interval={CUT}ba', 'optimizer.warmup=2ba']


# ------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize('config, algorithm', [(PiKEConfig, PiKE), (LossSlopeConfig, LossSlope)])
def test_yaml_defaults_are_the_algorithms(config, algorithm):
    """``mixing.pike`` and ``mixing.loss_slope`` default every key to the Algorithm's own default, so a YAML run
    and a Python run of the same algorithm agree (README documents one set)."""
    parameters = inspect.signature(algorithm).parameters
    for field in dataclasses.fields(config):
        assert field.name in parameters, f'{config.__name__}.{field.name} is not an argument of {algorithm.__name__}'
        assert field.default == parameters[field.name].default, (field.name, field.default,
                                                                 parameters[field.name].default)


@pytest.mark.parametrize('path', YAMLS, ids=os.path.basename)
def test_every_yaml_validates_and_selects_every_policy_by_one_key(path):
    config = load_config(path)
    assert config.run_name and config.data.manifest
    if config.trainer.autoresume:
        assert config.trainer.save_folder
    for policy in POLICIES:
        extra = ['mixing.weights={a: 1, b: 3}'] if policy == 'fixed' else []
        assert load_config(path, [f'mixing.policy={policy}', *extra]).mixing.policy == policy
    # GPU configs become CPU configs by overrides alone (and are refused on CPU without them).
    cpu = ['trainer.device=cpu', 'trainer.precision=fp32']
    if config.trainer.fsdp is not None:
        cpu.append('trainer.fsdp.fsdp_version=2')
    check_machine(load_config(path, cpu), 'cpu')
    if config.trainer.precision != 'fp32' or config.trainer.fsdp is not None:
        with pytest.raises(ConfigError, match='needs a GPU'):
            check_machine(config, 'cpu')


def test_demo_yaml_validates():
    config = load_config(DEMO_YAML)
    assert config.mixing.policy == 'pike' and config.data.manifest == 'runs/demo/data'


# (override, the key the error must name, a hint it must hold): also run as CLI calls by benchmarks/fault_matrix.py
BAD_OVERRIDES = [
    ('trainer.max_durration=10ba', 'max_durration', "did you mean 'max_duration'"),
    ('data.global_batch_size=many', 'global_batch_size', ''),
    ('trainer.autoresume=maybe', 'trainer.autoresume', ''),
    ('mixing.pike.check_intervl=5', 'check_intervl', "did you mean 'check_interval'"),
    ('mixing.policy=round_robbin', 'mixing.policy', "did you mean 'round_robin'"),
    ('trainer.precision=bf16', 'trainer.precision', "did you mean 'amp_bf16'"),
    ('model.family=gpt3', 'model.family', "did you mean 'gpt2'"),
    ('data.on_exhausted=repeats', 'data.on_exhausted', "did you mean 'repeat'"),
    ('trainer.max_duration=10bb', 'trainer.max_duration', 'not a duration'),
    ('optimizer.warmup=soon', 'optimizer.warmup', 'not a duration'),
    ('trainer.fsdp.sharding_stratgy=FULL_SHARD', 'trainer.fsdp.sharding_stratgy', "did you mean 'sharding_strategy'"),
    ('trainer.fsdp.fsdp_version=3', 'trainer.fsdp.fsdp_version', ''),
    ('loggers.wandb.projct=pike', 'loggers.wandb.projct', "did you mean 'project'"),
    ('loggers.neptune.project=pike', 'neptune', ''),
    ('mixing.pike.num_chunks=1', 'mixing.pike', 'num_chunks'),
    ('mixing.weights={d0: -1}', 'mixing.weights', 'non-negative'),
    ('mixing.policy=fixed', 'mixing.weights', 'needs mixing.weights'),
    ('trainer.autoresume=true', 'trainer.autoresume', 'save_folder'),
    ('data.download_retry=0', 'data.download_retry', 'at least 1'),
    ('mixing.pike.update=evidense', 'mixing.pike.update', "did you mean 'evidence'"),
    ('mixing.pike.zeta1=0.5', 'mixing.pike', 'set both zeta1 and zeta2'),
    ('mixing.pike.zeta_ratio=often', 'mixing.pike', "zeta_ratio must be 'auto' or > 0"),
    ('data.download_timeout=0', 'data.download_timeout', 'positive'),
    ('mixing.loss_slope.window=1', 'mixing.loss_slope', 'window must be > 1'),
    ('mixing.tau=-1', 'mixing.tau', 'must be >= 0'),
    ('data.global_batch_size=0', 'data.global_batch_size', 'at least 1, got 0'),
    ('data.num_workers=-1', 'data.num_workers', 'at least 0'),
    ('data.steps_per_epoch=0', 'data.steps_per_epoch', 'at least 1'),
    ('data.prefetch_factor=0', 'data.prefetch_factor', 'at least 1'),
    ('mixing.temperature=0', 'mixing.temperature', 'must be > 0'),
]


@pytest.mark.parametrize('override, key, hint', BAD_OVERRIDES)
def test_bad_keys_and_values_name_the_key(override, key, hint):
    with pytest.raises(ConfigError, match=key) as error:
        load_config(DEMO_YAML, [override])
    assert hint in str(error.value)


def test_models_from_config_and_from_a_local_pretrained_directory(tmp_path):
    """Both model families build from the config's sizes; a local pretrained directory loads as saved, and one too
    small for the data (vocabulary or positions) fails naming the key instead of an index error in training."""
    import torch
    import transformers

    for family, network_class in (('gpt2', transformers.GPT2LMHeadModel), ('llama', transformers.LlamaForCausalLM)):
        config = load_config(DEMO_YAML, [f'model.family={family}', 'model.d_model=32', 'model.n_layers=2',
                                         'model.n_heads=2'])
        network = build_model(config, 300, 64, 0, 1).model
        assert isinstance(network, network_class)
        assert network.get_input_embeddings().weight.shape == (300, 32)
        assert network.config.num_hidden_layers == 2
    saved = tmp_path / 'pretrained'
    network.save_pretrained(saved)  # the llama one: vocabulary 300, 64 positions
    loaded = build_model(load_config(DEMO_YAML, [f'model.pretrained_path={saved}']), 300, 64, 0, 1).model
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    torch.testing.assert_close(loaded.get_input_embeddings().weight, network.get_input_embeddings().weight)
    for vocab_size, seq_len in ((301, 64), (300, 65)):
        with pytest.raises(ConfigError, match=r"'model.pretrained_path'.*300 token embeddings and 64 positions"):
            build_model(load_config(DEMO_YAML, [f'model.pretrained_path={saved}']), vocab_size, seq_len, 0, 1)


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('trainer:\n  max_duration: [10ba\n')
    with pytest.raises(ConfigError, match='bad.yaml'):
        load_config(str(bad))


def test_missing_manifest_is_reported():
    with pytest.raises(ConfigError, match='data.manifest'):
        load_config(None, ['run_name=x'])


def test_weight_presets_resolve_and_placeholders_refuse():
    with pytest.raises(ConfigError, match=r"mixing.presets.unset': a placeholder without numbers for news"):
        load_config(GLAM_YAML, ['mixing.policy=fixed', 'mixing.preset=unset', 'mixing.presets.unset.books=0.5',
                                'mixing.presets.unset.news=???'])
    with pytest.raises(ConfigError, match="did you mean 'doremi'"):
        load_config(GLAM_YAML, ['mixing.preset=doremy'])
    config = load_config(DEMO_YAML, ['mixing.policy=fixed', 'mixing.preset=mine', 'mixing.presets.mine.d0=1',
                                     'mixing.presets.mine.d2=3'])
    assert dict(config.mixing.weights) == {'d0': 1.0, 'd2': 3.0}
    with pytest.raises(ConfigError, match='not both'):
        load_config(DEMO_YAML, ['mixing.preset=mine', 'mixing.presets.mine.d0=1', 'mixing.weights.d1=1'])


@pytest.mark.parametrize('overrides, match', [
    (['trainer.device=cpu', 'trainer.precision=amp_bf16'], "'trainer.precision': amp_bf16 needs a GPU"),
    (['trainer.device=cpu', 'trainer.fsdp.fsdp_version=1'], "'trainer.fsdp': FSDP1 needs a GPU"),
    (['trainer.device=cpu', 'loggers.tensorboard={}'], "'loggers.tensorboard'.*pip install tensorboard"),
    (['trainer.device=cpu', 'mixing.weights.web=1'], "'mixing.weights'.*unknown domains \\['web'\\]"),
])
def test_machine_and_domain_errors_come_before_any_data_is_read(tmp_path, monkeypatch, overrides, match):
    """The manifest names domains whose directories do not exist: reading any shard would fail differently."""
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # not installed, whatever this env has
    root = tmp_path / 'data'
    root.mkdir()
    (root / 'manifest.json').write_text(json.dumps(manifest_json(16)))
    with pytest.raises(ConfigError, match=match):
        main([DEMO_YAML, f'data.manifest={root}', f'run_dir={tmp_path / "run"}', *overrides])


def test_optional_loggers_are_built_when_their_package_imports(monkeypatch):
    from composer.loggers import WandBLogger

    monkeypatch.setitem(sys.modules, 'wandb', types.ModuleType('wandb'))
    loggers = build_loggers(load_config(DEMO_YAML, ['loggers.wandb.project=pike', 'loggers.wandb.tags=[a]']))
    assert len(loggers) == 1 and isinstance(loggers[0], WandBLogger) and loggers[0].project == 'pike'
    assert build_loggers(load_config(DEMO_YAML)) == []
    monkeypatch.setitem(sys.modules, 'wandb', None)
    with pytest.raises(ConfigError, match="'loggers.wandb'.*'wandb' package is not installed"):
        build_loggers(load_config(DEMO_YAML, ['loggers.wandb={}']))


def test_policies_resolve_to_loader_settings():
    names, sizes = ['a', 'b', 'c'], [1000, 100, 10]
    np.testing.assert_allclose(temperature_weights(sizes, 1.0), np.array(sizes) / sum(sizes))
    flatter = temperature_weights(sizes, 3.0)
    assert flatter[0] < 1000 / 1110 and flatter[2] > 10 / 1110
    assert plan_policy('random', names, sizes).batching == 'random'
    assert plan_policy('round_robin', names, sizes).batching == 'round_robin'
    fixed = plan_policy('fixed', names, sizes, weights={'a': 2, 'c': 2})
    np.testing.assert_allclose(fixed.weights, [0.5, 0.0, 0.5])
    assert plan_policy('balanced_pike', names, sizes, tau=3).tau == 3 and plan_policy('pike', names, sizes).tau == 0
    kkt = plan_policy('pike_kkt', names, sizes, tau=3)
    assert (kkt.adaptive, kkt.tau, kkt.update, kkt.batching) == (True, 0.0, 'kkt', 'mix')
    assert plan_policy('pike', names, sizes).update is None  # mixing.pike.update decides
    np.testing.assert_allclose(kkt.weights, np.full(3, 1 / 3))
    slope = plan_policy('loss_slope', names, sizes, weights={'a': 1, 'b': 1, 'c': 2})
    assert (slope.adaptive, slope.algorithm, slope.batching) == (True, 'loss_slope', 'mix')
    np.testing.assert_allclose(slope.weights, [0.25, 0.25, 0.5])  # the prior
    assert slope.tau == 0
    balanced_slope = plan_policy('balanced_loss_slope', names, sizes, tau=2)
    assert (balanced_slope.adaptive, balanced_slope.algorithm, balanced_slope.tau) == (True, 'loss_slope', 2)
    assert plan_policy('pike', names, sizes).algorithm == 'pike' and not plan_policy('mix', names, sizes).adaptive
    with pytest.raises(ValueError, match="needs mixing.weights"):
        plan_policy('fixed', names, sizes)
    with pytest.raises(ValueError, match="unknown domains"):
        plan_policy('fixed', names, sizes, weights={'z': 1})


@pytest.mark.parametrize('policy, algorithm_options, tau', [
    ('pike', pike_options, 0.0), ('balanced_pike', pike_options, 2.0),
    ('loss_slope', loss_slope_options, 0.0), ('balanced_loss_slope', loss_slope_options, 2.0)])
def test_balanced_policies_hand_mixing_tau_to_their_algorithm(policy, algorithm_options, tau):
    config = load_config(DEMO_YAML, [f'mixing.policy={policy}', 'mixing.tau=2', 'mixing.loss_slope.window=3'])
    options = algorithm_options(config.mixing)
    assert options['tau'] == tau
    if algorithm_options is loss_slope_options:  # the policy's tau joins mixing.loss_slope's own keys
        assert options['window'] == 3 and LossSlope(**options).tau == tau


# ------------------------------------------------------------------------------------- runs


def manifest_json(seq_len: int, names=DOMAINS) -> dict:
    return {'format': 'composer-pike-manifest/1', 'seq_len': seq_len, 'seed': 0,
            'tokenizer': {'name': 'test', 'vocab_size': 4200, 'eos_token_id': 1, 'pad_token_id': 0},
            'domains': {name: {'splits': {split: {'path': f'{name}/{split}'} for split in ('train', 'val')}}
                        for name in names}}


def write_manifest(root, sizes=(80, 60, 40), seq_len=16):
    """A pike-prep style manifest over MDS domains written by mds_helpers (a fresh copy per run: every
    StreamingDataset of a process needs its own local directory)."""
    for k, size in enumerate(sizes):
        for split, count in (('train', size), ('val', 12)):
            write_domain(os.path.join(root, f'd{k}', split), k, count, seq_len=seq_len)
    with open(os.path.join(root, 'manifest.json'), 'w') as f:
        json.dump(manifest_json(seq_len, [f'd{k}' for k in range(len(sizes))]), f)
    return str(root)


def broken_manifests():
    """(manifest.json text, the error it must give): each names the file or the missing key."""
    good = manifest_json(16)
    no_tokenizer = {key: value for key, value in good.items() if key != 'tokenizer'}
    no_path = {**good, 'domains': {**good['domains'], 'wiki': {'splits': {'train': {}}}}}
    return [('{"domains": ', r'manifest .*manifest\.json is not valid JSON'),
            ('[]', r"manifest .*manifest\.json has no 'domains' mapping"),
            (json.dumps(no_path), r"manifest .*manifest\.json: domain 'wiki' needs 'splits' with a 'path'"),
            (json.dumps(no_tokenizer),
             r"'data.manifest': .* records no tokenizer vocab_size, eos_token_id, pad_token_id")]


@pytest.mark.parametrize('text, match', broken_manifests())
def test_a_broken_manifest_is_named(tmp_path, text, match):
    root = tmp_path / 'data'
    root.mkdir()
    (root / 'manifest.json').write_text(text)
    with pytest.raises(ValueError, match=match):
        main([DEMO_YAML, f'data.manifest={root}', f'run_dir={tmp_path / "run"}', 'trainer.device=cpu'])


class BatchRecorder(Callback):
    """The (domain, sample_id) pairs each step trains on, by 0-based step."""

    def __init__(self) -> None:
        self.rows: dict[int, list[tuple[int, int]]] = {}

    def after_dataloader(self, state, logger) -> None:
        pairs = zip(state.batch['domain'].tolist(), state.batch['sample_id'].tolist())
        self.rows[int(state.timestamp.batch)] = list(pairs)


class Interrupted(Exception):
    pass


class InterruptAfter(Callback):
    """Raises at the end of step ``step`` (1-based, after its checkpoint event), like a crash.

    ``settle(state)`` runs at the end of every earlier step.
    """

    def __init__(self, step: int, settle=None) -> None:
        self.step = step
        self.settle = settle

    def batch_checkpoint(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.step:
            raise Interrupted(self.step)
        if self.settle is not None:
            self.settle(state)


def read_series(path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in open(path):
        record = json.loads(line)
        for name, value in record.items():
            if name != 'step':
                series.setdefault(name, []).append((record['step'], value))
    return series


def run(root, name, *overrides, interrupt=None):
    """One in-process run of the entry point on a fresh copy of the data.

    Returns (trainer, or None when interrupted by an exception; the batch recorder; the metric series of this run).
    """
    recorder = BatchRecorder()
    config = load_config(DEMO_YAML, [*TINY, f'data.manifest={write_manifest(root / f"data-{name}")}',
                                     'run_name=resume', f'run_dir={root / "run"}',
                                     f'trainer.log_file={root / f"{name}.jsonl"}', *overrides])
    try:
        trainer = train(config, callbacks=[recorder, *([interrupt] if interrupt else [])])
    except Interrupted:
        trainer = None
    return trainer, recorder, read_series(root / f'{name}.jsonl')


@pytest.mark.parametrize('policy, overrides', [
    ('fixed', ['mixing.weights={d0: 0.5, d1: 0.25, d2: 0.25}']),
    ('round_robin', []),
])
def test_static_policies_train_the_batches_they_plan(tmp_path, policy, overrides):
    """The entry point with a static policy: no mixing algorithm, and every step's batch is the plan's (fixed:
    4/2/2 of 8 every step; round_robin: whole batches of d0, d1, d2 in turn); the monitor logs the plan."""
    trainer, recorder, series = run(tmp_path, policy, f'mixing.policy={policy}', *overrides)
    assert not [a for a in trainer.state.algorithms if isinstance(a, (PiKE, LossSlope))]
    assert not [key for key in series if key.startswith(('pike/', 'loss_slope/'))]
    assert sorted(recorder.rows) == list(range(TOTAL))
    for step, rows in recorder.rows.items():
        counts = np.bincount([domain for domain, _ in rows], minlength=3).tolist()
        assert counts == ([4, 2, 2] if policy == 'fixed' else [8 * (k == step % 3) for k in range(3)]), step
    logged = {step: value for step, value in series['mixture/weight/d0']}
    assert logged and all(value == (0.5 if policy == 'fixed' else 1 / 3) for value in logged.values())


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp('uninterrupted')
    return run(root, 'full', f'trainer.save_folder={root / "ckpt"}', f'trainer.save_interval={CUT}ba',
               'trainer.autoresume=true', 'trainer.progress_bar=true')


def test_train_entry_point_end_to_end(uninterrupted):
    from composer.loggers import FileLogger, ProgressBarLogger

    trainer, recorder, series = uninterrupted
    assert int(trainer.state.timestamp.batch) == TOTAL and sorted(recorder.rows) == list(range(TOTAL))
    destinations = trainer.logger.destinations
    assert any(isinstance(d, ProgressBarLogger) for d in destinations)
    assert [os.path.basename(d.filename) for d in destinations if isinstance(d, FileLogger)] == ['log-rank0.txt']
    for domain in DOMAINS:
        assert [b for b, _ in series[f'metrics/val_{domain}/LanguageCrossEntropy']] == [CUT, TOTAL]
        assert f'pike/weight/{domain}' in series and f'mixture/epochs/{domain}' in series
    for step, worst in series['eval/worst_loss']:
        losses = [dict(series[f'metrics/val_{d}/LanguageCrossEntropy'])[step] for d in DOMAINS]
        assert worst == pytest.approx(max(losses)) and dict(series['eval/avg_loss'])[step] == pytest.approx(
            np.mean(losses))
    weights = np.array([[v for _, v in series[f'pike/weight/{d}']] for d in DOMAINS])
    np.testing.assert_allclose(weights.sum(axis=0), 1.0)
    assert not np.allclose(weights, 1 / 3)  # PiKE moved the weights


def check_resumed_run(uninterrupted, interrupted, resumed, prefix: str = 'pike') -> None:
    """The interrupted run up to its checkpoint plus the resumed run equal the uninterrupted run exactly
    (``prefix``: the adaptive algorithm's metrics, ``pike`` or ``loss_slope``)."""
    _, full_rows, full = uninterrupted
    _, first_rows, first = interrupted
    trainer, second_rows, second = resumed
    assert trainer.state.dataset_resumption.get('train') is True  # the loader state was restored, no spinning
    assert sorted(first_rows.rows) == list(range(CRASH)) and sorted(second_rows.rows) == list(range(CUT, TOTAL))
    assert {**{s: first_rows.rows[s] for s in range(CUT)}, **second_rows.rows} == full_rows.rows
    keys = [f'{prefix}/weight/{d}' for d in DOMAINS] + [f'metrics/val_{d}/LanguageCrossEntropy' for d in DOMAINS]
    for key in keys:
        assert [(b, v) for b, v in first[key] if b <= CUT] + second[key] == full[key], key
    assert len(second[f'{prefix}/weight/d0']) >= 2  # the resumed run made its own updates


def autoresume_options(save_folder: str) -> list[str]:
    return [f'trainer.save_folder={save_folder}', f'trainer.save_interval={CUT}ba', 'trainer.autoresume=true']


def test_autoresume_from_a_local_folder(uninterrupted, tmp_path):
    options = autoresume_options(str(tmp_path / 'ckpt'))
    interrupted = run(tmp_path, 'first', *options, interrupt=InterruptAfter(CRASH))
    assert interrupted[0] is None and (tmp_path / 'ckpt' / f'ep0-ba{CUT}-rank0.pt').is_file()
    check_resumed_run(uninterrupted, interrupted, run(tmp_path, 'second', *options))


# loss-slope mixing: a bin every step, weights moving on any difference (evidence_z=0) from step 4 on
LOSS_SLOPE = ['mixing.policy=loss_slope', 'mixing.loss_slope.check_interval=1', 'mixing.loss_slope.evidence_z=0']


def test_loss_slope_trains_and_resumes_exactly(tmp_path):
    """The training-loss history is checkpointed: a run killed after step CRASH and resumed from its
    step-CUT checkpoint logs the same weights and losses as the uninterrupted run."""
    full = run(tmp_path / 'full', 'full', *LOSS_SLOPE)
    _, _, series = full
    weights = np.array([[v for _, v in series[f'loss_slope/weight/{d}']] for d in DOMAINS])
    assert weights.shape[1] == TOTAL and not np.allclose(weights[:, -1], 1 / 3)  # one check per step, moving
    assert all(f'loss_slope/elasticity/{d}' in series for d in DOMAINS)
    options = autoresume_options(str(tmp_path / 'ckpt'))
    interrupted = run(tmp_path, 'first', *LOSS_SLOPE, *options, interrupt=InterruptAfter(CRASH))
    check_resumed_run(full, interrupted, run(tmp_path, 'second', *LOSS_SLOPE, *options), prefix='loss_slope')


def test_balanced_loss_slope_tilts_by_its_logged_loss_weights(tmp_path):
    """mixing.policy=balanced_loss_slope hands mixing.tau to LossSlope: every check logs loss weights
    K softmax(tau L) of the logged training losses, and the weights move differently from plain
    loss-slope mixing's on the same data."""
    _, _, tilted = run(tmp_path / 'tilted', 'tilted', *LOSS_SLOPE, 'mixing.policy=balanced_loss_slope', 'mixing.tau=2')
    _, _, plain = run(tmp_path / 'plain', 'plain', *LOSS_SLOPE)
    losses = np.array([[v for _, v in tilted[f'loss_slope/train_loss/{d}']] for d in DOMAINS])
    loss_weights = np.array([[v for _, v in tilted[f'loss_slope/loss_weight/{d}']] for d in DOMAINS])
    softmax = np.exp(2 * (losses - losses.max(axis=0)))
    np.testing.assert_allclose(loss_weights, len(DOMAINS) * softmax / softmax.sum(axis=0), rtol=1e-6)
    assert not any(key.startswith('loss_slope/loss_weight/') for key in plain)
    final = [tilted[f'loss_slope/weight/{d}'][-1][1] - plain[f'loss_slope/weight/{d}'][-1][1] for d in DOMAINS]
    assert np.abs(final).max() > 1e-3


def test_loss_slope_checkpoint_between_checks_keeps_the_open_interval(tmp_path):
    """Bins of 3 steps, checkpoint after step 4: the bin of steps 4-6 holds step 4's samples after the
    resume too (its mean training loss matches the uninterrupted run's)."""
    every_third = [*LOSS_SLOPE, 'mixing.loss_slope.check_interval=3']
    _, _, full = run(tmp_path / 'full', 'full', *every_third)
    options = autoresume_options(str(tmp_path / 'ckpt'))
    run(tmp_path, 'first', *every_third, *options, interrupt=InterruptAfter(CRASH))
    _, _, second = run(tmp_path, 'second', *every_third, *options)
    for d in DOMAINS:
        key = f'loss_slope/train_loss/{d}'
        assert [step for step, _ in full[key]] == [3, 6] and second[key] == full[key][1:], key


def test_autoresume_from_s3(uninterrupted, s3_server, tmp_path, monkeypatch):
    """Checkpoints on moto's S3; the resumed run starts in another directory, so it must download them.

    Composer uploads a checkpoint's remote ``latest`` pointer only once it has seen the checkpoint on the
    store (polling every 30 s; 0.2 s here) and at a later step's end, so the crash is made to come after
    that, as it would for a job that dies some time after its last checkpoint.
    """
    from composer.callbacks import CheckpointSaver
    from composer.utils import remote_uploader

    init = CheckpointSaver.__init__

    def fast_poll(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._symlink_upload_wait_before_next_try_in_seconds = 0.2

    def uploads_confirmed(state) -> None:
        saver = next(c for c in state.callbacks if isinstance(c, CheckpointSaver))
        deadline = time.monotonic() + 120
        while not all(future.done() for future, _, _ in saver.symlink_upload_tasks):
            assert time.monotonic() < deadline, 'checkpoint upload not confirmed in 120 s'
            time.sleep(0.1)

    monkeypatch.setattr(CheckpointSaver, '__init__', fast_poll)
    # Composer's upload pools spawn fresh interpreters that import torch (tens of seconds on 2 busy cores);
    # forked ones start at once. Test time only.
    monkeypatch.setattr(remote_uploader, 'multiprocessing', types.SimpleNamespace(
        get_context=lambda method: multiprocessing.get_context('fork')))
    bucket = s3_server.create_bucket('pike-train-resume')
    options = autoresume_options(f'{bucket}/checkpoints/resume')
    for node in ('node-a', 'node-b'):
        (tmp_path / node).mkdir()
    monkeypatch.chdir(tmp_path / 'node-a')
    interrupted = run(tmp_path, 'first', *options, interrupt=InterruptAfter(CRASH, settle=uploads_confirmed))
    assert interrupted[0] is None
    keys = {o['Key'] for o in s3_server.client().list_objects_v2(Bucket='pike-train-resume')['Contents']}
    assert {f'checkpoints/resume/ep0-ba{CUT}-rank0.pt', 'checkpoints/resume/latest-rank0.pt.symlink'} <= keys, keys
    monkeypatch.chdir(tmp_path / 'node-b')
    resumed = run(tmp_path, 'second', *options)
    assert list((tmp_path / 'node-b').rglob('latest-rank0.pt'))  # Composer downloaded the checkpoint from S3 here
    check_resumed_run(uninterrupted, interrupted, resumed)


# ------------------------------------------------------------------------------------- two processes


CPU_FSDP2 = ['trainer.device=cpu', 'trainer.precision=fp32', 'trainer.fsdp.fsdp_version=2',
             'trainer.device_train_microbatch_size=null']  # a GPU yaml moved to CPU with FSDP2


def launcher_env(tmp_dir, *paths: str) -> dict[str, str]:
    """Environment for `composer -n N` on CPU: no inherited rank variables, one thread per rank, its own
    TMPDIR (created here), the repository and ``paths`` importable."""
    os.makedirs(tmp_dir, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR',
                        'MASTER_PORT', 'FSDP_VERSION')}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', TOKENIZERS_PARALLELISM='false', TMPDIR=str(tmp_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, *paths, env.get('PYTHONPATH')])))
    return env


@pytest.mark.parametrize('policy', ['pike', 'loss_slope'])
def test_two_fsdp2_processes_through_the_composer_launcher(tmp_path, policy):
    """The paper-like GPU yaml, shrunk and moved to CPU by overrides, under `composer -n 2 -m composer_pike.train`."""
    data = write_manifest(tmp_path / 'data')
    out = tmp_path / 'out'
    env = launcher_env(tmp_path / 'tmp')
    overrides = [*TINY, 'data.num_workers=0', f'data.manifest={data}', f'run_dir={out}', 'model.n_layers=2',
                 *CPU_FSDP2, 'trainer.save_folder=null', 'trainer.autoresume=false',
                 f'trainer.log_file={out}/metrics-rank{{rank}}.jsonl', *(LOSS_SLOPE if policy == 'loss_slope' else [])]
    command = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(free_port()),
               '--stdout', str(tmp_path / 'rank{rank}.stdout'), '--stderr', str(tmp_path / 'rank{rank}.stderr'),
               '-m', 'composer_pike.train', MULTILINGUAL_YAML, *overrides]
    done = subprocess.run(with_private_shm(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs = ''.join(p.read_text()[-3000:] for p in sorted(tmp_path.glob('rank*.std*')))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:] + logs
    rank0, rank1 = (read_series(out / f'metrics-rank{r}.jsonl') for r in (0, 1))
    # pike before steps 2, 4, 6 (TINY's interval; the first check one interval in), loss_slope after every step
    checks = len(range(2, TOTAL, 2)) if policy == 'pike' else TOTAL
    for domain in DOMAINS:
        key = f'{policy}/weight/{domain}'
        assert rank0[key] == rank1[key] and len(rank0[key]) == checks, key  # identical on both ranks
        assert [b for b, _ in rank0[f'metrics/val_{domain}/LanguageCrossEntropy']] == [CUT, TOTAL]
    assert {'eval/avg_loss', 'eval/worst_loss'} <= set(rank0)
    assert not np.allclose([rank0[f'{policy}/weight/{d}'][-1][1] for d in DOMAINS], 1 / 3)
    if policy == 'loss_slope':  # every global sample scored once: the ranks' sums are all-reduced
        seen = sum(rank0[f'loss_slope/samples/{d}'][-1][1] for d in DOMAINS)
        assert seen == TOTAL * 8 and rank0['loss_slope/samples/d0'] == rank1['loss_slope/samples/d0']
    assert '[hyperparameter]: parameter_type: "DTensor"' in (out / 'log-rank0.txt').read_text()  # sharded by FSDP2


# The paper's Table 4 (PiKE, arXiv 2502.06244): GLaM and DoReMi weights of the six GLaM domains.
GLAM_TABLE = {'filtered_webpages': (0.42, 0.51), 'wikipedia': (0.06, 0.05), 'conversations': (0.28, 0.22),
              'forums': (0.02, 0.04), 'books': (0.20, 0.20), 'news': (0.02, 0.02)}
GLAM_SIZES_BTOK = {'filtered_webpages': 143, 'wikipedia': 3, 'conversations': 174, 'forums': 247, 'books': 390,
                   'news': 650}


@pytest.mark.parametrize('preset, column', [('glam', 0), ('doremi', 1)])
def test_glam_yaml_presets_hold_the_papers_weights(preset, column):
    names = list(GLAM_TABLE)
    table = np.array([GLAM_TABLE[name][column] for name in names])  # sums: GLaM 1.00, DoReMi 1.04
    for overrides in (['mixing.policy=fixed', f'mixing.preset={preset}'], [f'mixing.preset={preset}']):
        config = load_config(GLAM_YAML, overrides)
        assert sorted(config.mixing.weights) == sorted(names)
        np.testing.assert_allclose([config.mixing.weights[name] for name in names], table)
        plan = plan_policy(config.mixing.policy, names, [GLAM_SIZES_BTOK[name] for name in names],
                           weights=dict(config.mixing.weights))
        np.testing.assert_allclose(plan.weights, table / table.sum())
