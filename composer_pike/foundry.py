"""llm-foundry integration: the mixture loader as a registered dataloader (``name: pike_mixture``).

llm-foundry finds third-party components through entry points (declared in pyproject.toml):
``llmfoundry_dataloaders: pike_mixture`` (this builder) and ``llmfoundry_algorithms: pike``
(:class:`composer_pike.PiKE`). In an llm-foundry YAML::

    train_loader:
      name: pike_mixture
      manifest: s3://bucket/mix        # pike-prep output
      cache_root: /tmp/pike-cache
      num_workers: 8
    algorithms:
      pike: {check_interval: 1000, estimation_batch_size: 256}
"""
from __future__ import annotations

import inspect
from typing import Any

from composer.core import DataSpec
from composer.utils import dist

from composer_pike.data import MixtureDataset, build_mixture_dataloader, sources_from_manifest
from composer_pike.policies import named_weights


DATASET_OPTIONS = ('validate_hash', 'download_retry', 'download_timeout', 'verify_local')


def build_pike_dataloader(tokenizer: Any = None, device_batch_size: int = 1, cfg: dict[str, Any] | None = None,
                          **options: Any) -> DataSpec:
    """Build the PiKE mixture loader for llm-foundry.

    Accepts llm-foundry's two calling conventions: the loader config as ``cfg`` (older releases) or
    spread as keyword options (newer). The tokenizer is unused: samples are already tokenized by
    pike-prep. ``device_batch_size`` is per rank; the global batch is that times the world size.
    """
    del tokenizer
    settings = {key: value for key, value in dict(cfg or {}, **options).items() if key != 'name'}
    manifest = settings.pop('manifest', None)
    if manifest is None:
        raise ValueError("train_loader.manifest is required for the pike_mixture loader")
    split, cache_root = settings.pop('split', 'train'), settings.pop('cache_root', None)
    dataset_options = {key: settings.pop(key) for key in DATASET_OPTIONS if key in settings}
    accepted = set(inspect.signature(build_mixture_dataloader).parameters) - {'dataset', 'global_batch_size'}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ValueError(f"train_loader.{unknown[0]}: not an option of the pike_mixture loader (options: manifest, "
                         f"split, cache_root, {', '.join(DATASET_OPTIONS)}, {', '.join(sorted(accepted))})")
    dataset = MixtureDataset(sources_from_manifest(manifest, split, cache_root),
                             **{'validate_hash': 'xxh64', **dataset_options})
    weights = settings.pop('weights', None)
    if weights is not None:
        settings['weights'] = named_weights(weights, dataset.domain_names)
    loader = build_mixture_dataloader(dataset, int(device_batch_size) * dist.get_world_size(), **settings)
    return DataSpec(loader)
