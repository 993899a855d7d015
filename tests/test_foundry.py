"""The llm-foundry entry points resolve to the algorithm and the mixture loader builder."""
import importlib.metadata

import pytest
from composer.core import DataSpec
from test_train import write_manifest

from composer_pike import PiKE
from composer_pike.data import MixtureDataLoader


def entry_point(group, name):
    matches = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == name]
    assert len(matches) == 1, f'{group}:{name} is not declared (is the package installed?)'
    return matches[0].load()


def test_algorithm_entry_point_is_pike():
    assert entry_point('llmfoundry_algorithms', 'pike') is PiKE


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


def test_llm_foundry_registry_finds_pike_when_installed():
    registry = pytest.importorskip('llmfoundry.registry', reason='llm-foundry is not installed (optional)')
    assert registry.algorithms.get('pike') is PiKE
    assert registry.dataloaders.get('pike_mixture') is entry_point('llmfoundry_dataloaders', 'pike_mixture')
