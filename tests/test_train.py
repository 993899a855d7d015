"""The YAML training entry point: schema validation, policies, and a tiny end-to-end run."""
import json
import os

import numpy as np
import pytest
from mds_helpers import write_domain

from composer_pike.policies import plan_policy, temperature_weights
from composer_pike.train import ConfigError, load_config, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_YAML = os.path.join(REPO, 'yamls', 'demo_cpu.yaml')


def test_demo_yaml_validates():
    config = load_config(DEMO_YAML)
    assert config.mixing.policy == 'pike' and config.data.manifest == 'runs/demo/data'


@pytest.mark.parametrize('override, key, hint', [
    ('trainer.max_durration=10ba', 'max_durration', "did you mean 'max_duration'"),
    ('data.global_batch_size=many', 'global_batch_size', ''),
    ('mixing.pike.check_intervl=5', 'check_intervl', "did you mean 'check_interval'"),
])
def test_bad_keys_and_types_name_the_key(override, key, hint):
    with pytest.raises(ConfigError, match=key) as error:
        load_config(DEMO_YAML, [override])
    assert hint in str(error.value)


def test_misspelled_policy_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'round_robin'"):
        load_config(DEMO_YAML, ['mixing.policy=round_robbin'])


def test_missing_manifest_is_reported():
    with pytest.raises(ConfigError, match='data.manifest'):
        load_config(None, ['run_name=x'])


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
    with pytest.raises(ValueError, match="needs mixing.weights"):
        plan_policy('fixed', names, sizes)
    with pytest.raises(ValueError, match="unknown domains"):
        plan_policy('fixed', names, sizes, weights={'z': 1})


def write_manifest(root, sizes, seq_len=16):
    """A pike-prep style manifest over MDS domains written by mds_helpers."""
    domains = {}
    for k, size in enumerate(sizes):
        for split, count in (('train', size), ('val', 12)):
            write_domain(os.path.join(root, f'd{k}', split), k, count, seq_len=seq_len)
        domains[f'd{k}'] = {'splits': {split: {'path': f'd{k}/{split}'} for split in ('train', 'val')}}
    manifest = {'format': 'composer-pike-manifest/1', 'seq_len': seq_len, 'seed': 0,
                'tokenizer': {'name': 'test', 'vocab_size': 4200, 'eos_token_id': 1, 'pad_token_id': 0},
                'domains': domains}
    with open(os.path.join(root, 'manifest.json'), 'w') as f:
        json.dump(manifest, f)
    return root


def test_train_entry_point_end_to_end(tmp_path):
    data = write_manifest(str(tmp_path / 'data'), [80, 60, 40])
    run_dir = tmp_path / 'run'
    main([DEMO_YAML, f'data.manifest={data}', f'run_dir={run_dir}', 'data.global_batch_size=8',
          'data.num_workers=0', 'data.eval_batch_size=4', 'model.d_model=32', 'model.n_heads=2',
          'trainer.max_duration=6ba', 'trainer.eval_interval=3ba', 'mixing.pike.check_interval=2',
          'mixing.pike.estimation_batch_size=8', 'mixing.pike.num_chunks=2', 'trainer.progress_bar=false'])
    records = [json.loads(line) for line in open(run_dir / 'metrics.jsonl')]
    names = set().union(*records)
    for domain in ('d0', 'd1', 'd2'):
        assert f'metrics/val_{domain}/LanguageCrossEntropy' in names
        assert f'pike/weight/{domain}' in names and f'mixture/epochs/{domain}' in names
    assert {'eval/avg_loss', 'eval/worst_loss'} <= names
    worst = [r['eval/worst_loss'] for r in records if 'eval/worst_loss' in r]
    per_domain = [r for r in records if 'metrics/val_d0/LanguageCrossEntropy' in r]
    assert len(worst) == 2 and len(per_domain) == 2
