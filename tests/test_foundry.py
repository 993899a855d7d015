"""The llm-foundry entry points and the ``pike_mixture`` builder's options (no training here: see
tests/test_foundry_train.py)."""
import importlib.metadata
import logging

import pytest
import torch
from composer.core import DataSpec
from foundry_runs import require_llmfoundry
from mds_helpers import write_domain
from test_train import write_manifest

from composer_pike import LossSlope, MixtureMonitor, PiKE
from composer_pike.callbacks import JsonlLogger
from composer_pike.data import MixtureDataLoader


def entry_point(group, name):
    matches = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == name]
    assert len(matches) == 1, f'{group}:{name} is not declared (is the package installed?)'
    return matches[0].load()


def test_algorithm_entry_points_are_pike_and_loss_slope():
    assert entry_point('llmfoundry_algorithms', 'pike') is PiKE
    assert entry_point('llmfoundry_algorithms', 'loss_slope') is LossSlope


@pytest.mark.parametrize('style', ['cfg', 'kwargs'])
def test_dataloader_entry_point_builds_the_mixture(tmp_path, style):
    data = write_manifest(str(tmp_path / 'data'), [30, 20])
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    options = {'name': 'pike_mixture', 'manifest': data, 'num_workers': 0, 'weights': {'d0': 3, 'd1': 1}}
    spec = build(tokenizer=None, device_batch_size=4, cfg=options) if style == 'cfg' else \
        build(tokenizer=None, device_batch_size=4, **options)
    assert isinstance(spec, DataSpec) and isinstance(spec.dataloader, MixtureDataLoader)
    batch = next(iter(spec.dataloader))
    assert batch['domain'].tolist() == [0, 0, 0, 1]


def test_dataloader_entry_point_names_an_unknown_option(tmp_path):
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    options = {'manifest': write_manifest(str(tmp_path / 'data'), [30, 20]), 'num_wokers': 0}
    with pytest.raises(ValueError, match=r"train_loader.num_wokers: not an option .*num_workers"):
        build(tokenizer=None, device_batch_size=4, cfg=options)


def test_dataloader_entry_point_passes_dataset_options(tmp_path):
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    options = {'manifest': write_manifest(str(tmp_path / 'data'), [30, 20]), 'num_workers': 0, 'split': 'val',
               'download_retry': 5, 'validate_hash': None}
    spec = build(tokenizer=None, device_batch_size=2, cfg=options)
    streams = spec.dataloader.dataset.streaming.streams
    assert [s.download_retry for s in streams] == [5, 5] and all(s.validate_hash is None for s in streams)
    assert spec.dataloader.dataset.domain_sizes.tolist() == [12, 12]  # the val split


def test_llm_foundry_registry_finds_every_component():
    require_llmfoundry()
    from llmfoundry import registry
    assert registry.algorithms.get('pike') is PiKE and registry.algorithms.get('loss_slope') is LossSlope
    assert registry.dataloaders.get('pike_mixture') is entry_point('llmfoundry_dataloaders', 'pike_mixture')
    assert registry.callbacks.get('pike_mixture_monitor') is MixtureMonitor
    assert registry.loggers.get('pike_jsonl') is JsonlLogger


def test_launcher_options_are_not_loader_options(tmp_path):
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    for key in ('rank', 'world_size'):
        options = {'manifest': write_manifest(str(tmp_path / key), [30, 20]), 'num_workers': 0, key: 0}
        with pytest.raises(ValueError, match=f'train_loader.{key}: not an option'):
            build(tokenizer=None, device_batch_size=4, **options)


def test_the_shuffle_seed_defaults_to_the_runs_global_seed(tmp_path):
    """llm-foundry seeds torch with its global `seed` before building loaders: the loader follows it."""
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    torch.manual_seed(1234)
    spec = build(tokenizer=None, device_batch_size=4, manifest=write_manifest(str(tmp_path / 'a'), [30, 20]),
                 num_workers=0)
    assert spec.dataloader.dataset.planner.seed == 1234
    spec = build(tokenizer=None, device_batch_size=4, manifest=write_manifest(str(tmp_path / 'b'), [30, 20]),
                 num_workers=0, seed=5)
    assert spec.dataloader.dataset.planner.seed == 5


def foundry_streams(tmp_path, encoding='ndarray:int32', seq_len=20):
    """Two domains laid out as llm-foundry streams: <root>/<name>/{train,val} with a shapeless int32
    tokens column (a fresh copy per call: every StreamingDataset of a process needs its own directory)."""
    root = tmp_path / f'streams{len(list(tmp_path.glob("streams*")))}'
    for k, name in enumerate(('web', 'code')):
        for split, count in (('train', 40), ('val', 6)):
            write_domain(str(root / name / split), k, count, seq_len=seq_len, token_encoding=encoding)
    return {'streams': {'web': {'local': str(root / 'web'), 'split': 'train', 'proportion': 3},
                        'code': {'local': str(root / 'code'), 'split': 'train', 'proportion': 1}},
            'max_seq_len': 16, 'shuffle': False, 'shuffle_seed': 9}


def test_a_dataset_streams_block_gives_one_domain_per_stream_with_its_proportion(tmp_path):
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    spec = build(tokenizer=None, device_batch_size=4, dataset=foundry_streams(tmp_path), num_workers=0,
                 drop_last=True)
    dataset = spec.dataloader.dataset
    assert dataset.domain_names == ['web', 'code'] and dataset.domain_sizes.tolist() == [40, 40]
    assert dataset.seq_len == 16 and dataset.planner.seed == 9
    assert dataset.weights_at(0).tolist() == [0.75, 0.25]
    batch = next(iter(spec.dataloader))
    assert batch['domain'].tolist() == [0, 0, 0, 1] and batch['input_ids'].shape == (4, 16)
    assert batch['input_ids'].dtype == torch.int64


def test_a_streams_block_names_what_it_cannot_take(tmp_path, caplog):
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    block = foundry_streams(tmp_path)
    block['streams']['web']['repeat'] = 2
    with pytest.raises(ValueError, match=r'train_loader.dataset.streams.web.repeat: not supported by pike_mixture'):
        build(tokenizer=None, device_batch_size=4, dataset=block, num_workers=0)
    block = foundry_streams(tmp_path)
    del block['streams']['code']['proportion']
    with pytest.raises(ValueError, match=r'train_loader.dataset.streams.code.proportion is missing'):
        build(tokenizer=None, device_batch_size=4, dataset=block, num_workers=0)
    with pytest.raises(ValueError, match=r'train_loader.dataset.shufle: not an option'):
        build(tokenizer=None, device_batch_size=4, dataset={**foundry_streams(tmp_path), 'shufle': True})
    with pytest.raises(ValueError, match=r'give exactly one of `manifest`'):
        build(tokenizer=None, device_batch_size=4, dataset=foundry_streams(tmp_path), manifest='x')
    with caplog.at_level(logging.WARNING, logger='composer_pike.foundry'):  # streaming's own sampling knobs
        build(tokenizer=None, device_batch_size=4, num_workers=0,
              dataset={**foundry_streams(tmp_path), 'shuffle_algo': 'py1e', 'predownload': 8})
    assert 'ignores train_loader.dataset.predownload, shuffle_algo' in caplog.text


def test_stream_shard_options_apply_to_every_domain_only_when_the_streams_agree(tmp_path, caplog):
    """The mixture reads every domain with one download_timeout / download_retry / validate_hash: streams that
    set one must agree, and a hash check cannot come from some streams only (llm-foundry's converters
    record no hashes, so a stream without one would fail it)."""
    from composer_pike.foundry import sources_from_foundry_dataset

    def options(web: dict, code: dict, **block_options) -> dict:
        block = foundry_streams(tmp_path)
        block['streams']['web'].update(web)
        block['streams']['code'].update(code)
        return sources_from_foundry_dataset({**block, **block_options})[2]

    assert options({'download_timeout': 30}, {'download_timeout': 30}) == {'download_timeout': 30}
    assert options({'download_retry': 5}, {}) == {'download_retry': 5}  # more attempts harm no domain
    assert options({'validate_hash': 'xxh64'}, {}, validate_hash='xxh64') == {'validate_hash': 'xxh64'}
    with pytest.raises(ValueError, match=r"streams.\*.download_timeout: .*web: 30, code: 600"):
        options({'download_timeout': 30}, {'download_timeout': 600})
    with pytest.raises(ValueError, match=r"web: 30, \(the dataset block\): 60"):
        options({'download_timeout': 30}, {}, download_timeout=60)
    with pytest.raises(ValueError, match=r"streams.web.validate_hash is not set while other streams set it"):
        options({}, {'validate_hash': 'xxh64'})
    with caplog.at_level(logging.WARNING, logger='composer_pike.foundry'):
        options({'keep_zip': True}, {})
    assert 'ignores train_loader.dataset.streams.web.keep_zip' in caplog.text


def test_a_domain_evaluation_loader_is_one_plain_pass_of_that_domain(tmp_path):
    """As an eval loader (`domain` set) every val sample of the domain comes once, in order, unweighted."""
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    block = foundry_streams(tmp_path)
    for stream in block['streams'].values():
        stream['split'] = 'val'
    spec = build(tokenizer=None, device_batch_size=4, dataset=block, domain='code')
    batches = list(spec.dataloader)
    assert [len(b['domain']) for b in batches] == [4, 2] and all(b['domain'].eq(1).all() for b in batches)
    assert torch.cat([b['sample_id'] for b in batches]).tolist() == list(range(6))
    with pytest.raises(ValueError, match=r"eval_loader.domain: 'books' is not a domain of this data \(domains: web, code\)"):
        build(tokenizer=None, device_batch_size=4, dataset=block, domain='books')
    manifest = write_manifest(str(tmp_path / 'manifest'), [30, 20])
    spec = build(tokenizer=None, device_batch_size=5, manifest=manifest, split='val', domain='d1')
    assert sum(len(b['domain']) for b in spec.dataloader) == 12  # write_manifest: 12 val samples per domain


def test_remote_streams_are_cached_into_local_as_llm_foundry_does(tmp_path, s3_server):
    """`remote: s3://.../web` with `split: train` reads s3://.../web/train into <local>/train."""
    from test_data import upload_tree
    block = foundry_streams(tmp_path)
    bucket = s3_server.create_bucket('pike-foundry-streams')
    client = s3_server.client()
    for name, stream in block['streams'].items():
        upload_tree(client, stream['local'], bucket.removeprefix('s3://'), name)
        stream.update(remote=f'{bucket}/{name}', local=str(tmp_path / 'cache' / name))
    build = entry_point('llmfoundry_dataloaders', 'pike_mixture')
    spec = build(tokenizer=None, device_batch_size=4, dataset=block, num_workers=0)
    assert [s.remote for s in spec.dataloader.dataset.sources] == [f'{bucket}/web/train', f'{bucket}/code/train']
    batch = next(iter(spec.dataloader))
    assert batch['domain'].tolist() == [0, 0, 0, 1]
    assert (tmp_path / 'cache' / 'web' / 'train' / 'index.json').is_file()
    # The loader has queued downloads of the shards the next steps need; let them finish while the
    # S3 server and its credentials are still up (left queued, they run at interpreter exit, after both).
    spec.dataloader.dataset.sampler.prefetcher.wait()
