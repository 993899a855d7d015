"""llm-foundry for real: ``llmfoundry train`` with PiKE and the ``pike_mixture`` loader, on CPU.

The YAMLs are the README's (yamls/llmfoundry/pike.yaml over a pike-prep manifest of the demo corpus,
yamls/llmfoundry/streams.yaml over shards written by llm-foundry's own converter); the tests change
only their ``variables`` (where data and tokenizer are) and what a case is about.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from foundry_runs import (REPO, SEQ_LEN, convert_with_llmfoundry, foundry_train, readme_block, require_llmfoundry,
                          save_byte_tokenizer, split_documents)
from omegaconf import OmegaConf

require_llmfoundry()

# Each llm-foundry run may take foundry_train's 900 s; a test runs up to two of them.
pytestmark = pytest.mark.timeout(1800)

PIKE_YAML = REPO / 'yamls' / 'llmfoundry' / 'pike.yaml'
STREAMS_YAML = REPO / 'yamls' / 'llmfoundry' / 'streams.yaml'
DEMO_DOMAINS = ('python_stdlib', 'licenses', 'c_headers', 'pydoc_topics')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    """The demo corpus (0.1 MB for the largest domain) as a pike-prep manifest (``manifest/``), as
    llm-foundry-converted shards (``foundry/<domain>/{train,val}``), and the byte tokenizer."""
    from streaming_prep.demo import build_demo_corpus
    from streaming_prep.pipeline import prepare
    root = tmp_path_factory.mktemp('foundry-data')
    raw = build_demo_corpus(str(root / 'raw'), max_mb_per_domain=0.1)
    prepare(raw, str(root / 'manifest'), seq_len=SEQ_LEN)
    tokenizer = save_byte_tokenizer(root / 'byte-tokenizer')
    for name in ('licenses', 'pydoc_topics', 'c_headers'):
        train, val = split_documents(Path(raw[name]), root / 'split' / name, val_documents=1)
        convert_with_llmfoundry(train, root / 'foundry' / name / 'train', tokenizer)
        convert_with_llmfoundry(val, root / 'foundry' / name / 'val', tokenizer)
    return root


def where(data: Path, run_dir: Path, dataset: str = 'manifest') -> list[str]:
    return [f'variables.data={data / dataset}', f'variables.tokenizer={data / "byte-tokenizer"}',
            f'variables.run_dir={run_dir}']


def test_readme_shows_the_yamls_the_tests_run():
    assert readme_block('### With PiKE over a pike-prep manifest') == PIKE_YAML.read_text()
    assert readme_block('### An existing run over llm-foundry shards') == STREAMS_YAML.read_text()


def test_pike_trains_with_per_domain_evaluation_and_mixture_metrics(data, tmp_path):
    run = foundry_train(PIKE_YAML, tmp_path, *where(data, tmp_path))
    run.check()
    assert run.trained_batches == 24
    weights = {name: run.last(f'pike/weight/{name}') for name in DEMO_DOMAINS}
    assert abs(sum(weights.values()) - 1) < 1e-6 and max(abs(w - 0.25) for w in weights.values()) > 1e-3
    assert run.names('mixture/weight/') == {f'mixture/weight/{name}' for name in DEMO_DOMAINS}
    for name in DEMO_DOMAINS:  # one evaluator per domain, each a plain pass of that domain's val split
        assert run.series(f'metrics/eval/{name}/LanguageCrossEntropy'), f'no eval metric for {name}'
    assert run.series('pike/grad_sq_norm_se/licenses') and run.series('pike/probe_samples')
    assert (tmp_path / 'checkpoints' / 'ep0-ba24-rank0.pt').is_file()


def test_a_resumed_run_ends_with_the_same_model(data, tmp_path):
    """Resume from the 12-batch checkpoint of a 24-batch run: the final model is the same, bit for bit."""
    whole = foundry_train(PIKE_YAML, tmp_path / 'whole', *where(data, tmp_path / 'whole'))
    whole.check()
    halfway = tmp_path / 'whole' / 'checkpoints' / 'ep0-ba12-rank0.pt'
    resumed = foundry_train(PIKE_YAML, tmp_path / 'resumed', *where(data, tmp_path / 'resumed'), f'load_path={halfway}')
    resumed.check()
    assert resumed.series('pike/checks')[0][0] > 12  # it did not start again from batch 0
    final = [torch.load(p / 'checkpoints' / 'ep0-ba24-rank0.pt', weights_only=False)['state']['model']
             for p in (tmp_path / 'whole', tmp_path / 'resumed')]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key
    assert whole.last('pike/weight/licenses') == resumed.last('pike/weight/licenses')


def test_on_exhausted_stop_ends_training_cleanly_without_any_mixture_callback(data, tmp_path):
    """The loader stops llm-foundry's Trainer at the last batch; nothing else in the YAML does."""
    config = OmegaConf.load(PIKE_YAML)
    del config['callbacks']
    config.train_loader.on_exhausted = 'stop'
    config.max_duration = '100000ba'
    yaml = tmp_path / 'stop.yaml'
    OmegaConf.save(config, yaml)
    run = foundry_train(yaml, tmp_path, *where(data, tmp_path), 'save_interval=100000ba', timeout=600)
    run.check()
    assert 0 < run.trained_batches < 100  # c_headers (22 train samples, about 4 a batch) ran out


def test_two_ranks_train_like_one(data, tmp_path):
    one = foundry_train(PIKE_YAML, tmp_path / 'one', *where(data, tmp_path / 'one'))
    two = foundry_train(PIKE_YAML, tmp_path / 'two', *where(data, tmp_path / 'two'), ranks=2)
    one.check()
    two.check()
    for name in [*(f'pike/weight/{d}' for d in DEMO_DOMAINS), 'loss/train/total']:
        (steps_one, values_one), (steps_two, values_two) = zip(*one.series(name)), zip(*two.series(name))
        assert steps_two == steps_one
        assert values_two == pytest.approx(values_one, rel=1e-3, abs=1e-4), name


def test_loss_slope_replaces_pike_in_the_same_yaml(data, tmp_path):
    """``algorithms: {loss_slope: ...}`` instead of ``pike``: every training sample is scored once (two
    microbatches a step) and the weights move (evidence_z 0: on any difference)."""
    config = OmegaConf.load(PIKE_YAML)
    config.algorithms = {'loss_slope': {'check_interval': 2, 'evidence_z': 0}}
    yaml = tmp_path / 'loss_slope.yaml'
    OmegaConf.save(config, yaml)
    run = foundry_train(yaml, tmp_path, *where(data, tmp_path))
    run.check()
    assert run.trained_batches == 24 and not run.names('pike/')
    assert run.last('loss_slope/checks') == 12
    assert sum(run.last(f'loss_slope/samples/{d}') for d in DEMO_DOMAINS) == 24 * config.global_train_batch_size
    weights = [run.last(f'loss_slope/weight/{d}') for d in DEMO_DOMAINS]
    assert abs(sum(weights) - 1) < 1e-6 and max(abs(w - 0.25) for w in weights) > 1e-3


def test_an_llm_foundry_streams_block_over_its_converted_shards_trains_with_pike(data, tmp_path):
    run = foundry_train(STREAMS_YAML, tmp_path, *where(data, tmp_path, dataset='foundry'))
    run.check()
    assert run.trained_batches == 24
    assert run.names('pike/weight/') == {f'pike/weight/{name}' for name in ('licenses', 'pydoc_topics', 'c_headers')}
    assert run.last('pike/checks') == 3  # before batches 6, 12, 18: check_interval 6, the first one interval in
    assert run.series('metrics/eval/LanguageCrossEntropy')  # the eval_loader: licenses' val shards


def test_a_text_column_fails_with_how_to_convert(data, tmp_path):
    """Shards of raw text (llm-foundry's converter without --concat_tokens) are named, with the fix."""
    from streaming import MDSWriter
    text_dir = tmp_path / 'text' / 'licenses'
    with MDSWriter(out=str(text_dir / 'train'), columns={'text': 'str'}) as writer:
        for line in (data / 'split' / 'licenses' / 'train.jsonl').read_text().splitlines()[:3]:
            writer.write({'text': line})
    config = OmegaConf.load(STREAMS_YAML)
    config.train_loader.dataset.streams = {'licenses': {'local': str(text_dir), 'split': 'train'}}
    yaml = tmp_path / 'text.yaml'
    OmegaConf.save(config, yaml)
    run = foundry_train(yaml, tmp_path, *where(data, tmp_path, dataset='text'))
    assert run.returncode != 0
    assert "domain 'licenses': the shards hold a 'text' column and no 'tokens'" in run.output
    assert '--concat_tokens' in run.output
