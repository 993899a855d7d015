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


def test_llm_foundry_registry_finds_pike_when_installed():
    registry = pytest.importorskip('llmfoundry.registry', reason='llm-foundry is not installed (optional)')
    assert registry.algorithms.get('pike') is PiKE
    assert registry.dataloaders.get('pike_mixture') is entry_point('llmfoundry_dataloaders', 'pike_mixture')
