"""llm-foundry integration: the mixture loader as a registered dataloader (``name: pike_mixture``).

llm-foundry finds third-party components through entry points (declared in pyproject.toml):
``llmfoundry_dataloaders: pike_mixture`` (:func:`build_pike_dataloader`), ``llmfoundry_algorithms:
pike`` (:class:`composer_pike.PiKE`) and ``loss_slope`` (:class:`composer_pike.LossSlope`), and
``llmfoundry_callbacks: pike_mixture_monitor``
(:class:`composer_pike.MixtureMonitor`). The domains come either from a pike-prep ``manifest`` or
from the ``dataset.streams`` block an llm-foundry ``text`` loader already has (one domain per
stream, its ``proportion`` the initial weight), over shards written by llm-foundry's converters.
README "llm-foundry" shows complete YAMLs.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
from composer.core import DataSpec
from composer.utils import dist

from composer_pike.data import (DomainSource, MixtureDataset, TokenReader, build_domain_eval_loader,
                                build_mixture_dataloader, sources_from_manifest)
from composer_pike.policies import named_weights

log = logging.getLogger(__name__)

DATASET_OPTIONS = ('validate_hash', 'download_retry', 'download_timeout', 'verify_local')
# Loader keys of llm-foundry's `text` loader that mean nothing here: batches are always full.
IGNORED_LOADER_OPTIONS = ('drop_last',)
# `dataset` keys of llm-foundry's `text` loader that steer StreamingDataset's own sampling, which
# the mixture planner replaces; they are ignored with a warning, so a `text` YAML switches by its name.
IGNORED_STREAMING_OPTIONS = (
    'predownload', 'cache_limit', 'partition_algo', 'num_canonical_nodes', 'batch_size', 'shuffle_algo',
    'shuffle_block_size', 'sampling_method', 'sampling_granularity', 'batching_method', 'epoch_size', 'keep_zip',
    'allow_unsafe_types', 'replication', 'stream_name', 'stream_config', 'eos_token_id', 'bos_token_id')
STREAM_KEYS = ('remote', 'local', 'split', 'proportion', 'download_retry', 'download_timeout', 'validate_hash',
               'keep_zip')
STREAM_SHARD_OPTIONS = ('download_retry', 'download_timeout', 'validate_hash')  # one value for every stream
LOADER_ONLY = ('rank', 'world_size')  # come from the launcher, never from the YAML


def build_pike_dataloader(tokenizer: Any = None, device_batch_size: int | float = 1,
                          cfg: dict[str, Any] | None = None, **options: Any) -> DataSpec:
    """Build the mixture loader (or, with ``domain``, one domain's evaluation pass) for llm-foundry.

    Accepts llm-foundry's two calling conventions: the loader config as ``cfg`` (older releases) or
    spread as keyword options (newer). Samples are already token ids, so the tokenizer is unused.
    ``device_batch_size`` is per rank; the mixture's global batch is that times the world size.

    Options: ``manifest`` (pike-prep) or ``dataset`` (llm-foundry's block: ``streams`` or
    ``remote``/``local``, ``split``, ``max_seq_len``, ``shuffle``, ``shuffle_seed``,
    ``token_encoding_type``, download options); ``split`` and ``cache_root`` (manifest only);
    ``domain``: evaluate that domain alone, one plain pass; the shard options of
    :class:`MixtureDataset`; the options of :func:`build_mixture_dataloader` except rank and
    world size. ``seed`` defaults to the run's global seed (llm-foundry's ``seed``).
    """
    del tokenizer
    settings = {key: value for key, value in dict(cfg or {}, **options).items() if key != 'name'}
    for key in IGNORED_LOADER_OPTIONS:
        settings.pop(key, None)
    sources, proportions, dataset_options, tokens, loader_defaults = _domains(settings)
    domain = settings.pop('domain', None)
    accepted = set(inspect.signature(build_mixture_dataloader).parameters) - {'dataset', 'global_batch_size',
                                                                             *LOADER_ONLY}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ValueError(f"train_loader.{unknown[0]}: not an option of the pike_mixture loader (options: manifest "
                         f"or dataset, split, cache_root, domain, {', '.join(DATASET_OPTIONS)}, "
                         f"{', '.join(sorted(accepted))})")
    batch_size = int(device_batch_size)
    if domain is not None:
        return _domain_eval_spec(sources, str(domain), batch_size, tokens, dataset_options,
                                 settings.get('num_workers', 0))
    dataset = MixtureDataset(sources, tokens=tokens, **dataset_options)
    settings = {**loader_defaults, **settings}
    settings.setdefault('seed', global_seed())
    weights = settings.get('weights') if settings.get('weights') is not None else proportions
    if weights is not None:
        settings['weights'] = named_weights(weights, dataset.domain_names)
    loader = build_mixture_dataloader(dataset, batch_size * dist.get_world_size(), **settings)
    return DataSpec(loader)


def global_seed() -> int:
    """The run's seed: what ``reproducibility.seed_all`` gave torch (llm-foundry seeds before building
    loaders), rank 0's value on every rank so that all ranks plan the same batches."""
    seed = [torch.initial_seed() % 2**32]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(seed, src=0)
    return int(seed[0])


def _domains(settings: dict[str, Any]) -> tuple[list[DomainSource], dict[str, float] | None, dict[str, Any],
                                                TokenReader, dict[str, Any]]:
    """Pop the domain description from ``settings``: (sources, initial weights or None, shard options,
    token reader, loader defaults taken from the dataset block).

    Shards are hash-checked on download by default when they come from pike-prep (which records
    xxh64 hashes); llm-foundry's converters record none, so a ``dataset`` block follows llm-foundry's
    default (no check) unless it sets ``validate_hash``.
    """
    manifest, block = settings.pop('manifest', None), settings.pop('dataset', None)
    dataset_options = {key: settings.pop(key) for key in DATASET_OPTIONS if key in settings}
    if (manifest is None) == (block is None):
        raise ValueError('train_loader: give exactly one of `manifest` (a pike-prep manifest) and `dataset` '
                         '(an llm-foundry dataset block with `streams`)')
    split, cache_root = settings.pop('split', None), settings.pop('cache_root', None)
    if manifest is not None:
        downloads = {key: dataset_options[key] for key in ('download_timeout', 'download_retry')
                     if key in dataset_options}
        return (sources_from_manifest(manifest, split or 'train', cache_root, **downloads), None,
                {'validate_hash': 'xxh64', **dataset_options}, TokenReader(), {})
    if split is not None or cache_root is not None:
        key = 'split' if split is not None else 'cache_root'
        raise ValueError(f'train_loader.{key}: with a `dataset` block, give split and local paths in the block')
    sources, weights, block_options, tokens, loader_defaults = sources_from_foundry_dataset(dict(block))
    return sources, weights, {**block_options, **dataset_options}, tokens, loader_defaults


def sources_from_foundry_dataset(block: dict[str, Any]) -> tuple[list[DomainSource], dict[str, float] | None,
                                                                  dict[str, Any], TokenReader, dict[str, Any]]:
    """Domains from an llm-foundry ``dataset`` block: each stream of ``streams`` is a domain.

    Paths follow llm-foundry: a stream's files are at ``<remote or local>/<split>`` (``split``: the
    stream's own, else the block's, else none), and a remote is cached into ``local``. Returns
    (sources, proportions by domain or None, shard options, token reader, loader defaults).
    """
    if 'max_seq_len' not in block:
        raise ValueError('train_loader.dataset.max_seq_len is required (tokens per sample)')
    tokens = TokenReader(int(block.pop('max_seq_len')), str(block.pop('token_encoding_type', 'int64')))
    split = block.pop('split', None)
    streams = block.pop('streams', None)
    if streams is None:
        single = {key: block.pop(key) for key in ('remote', 'local') if key in block}
        if not single:
            raise ValueError('train_loader.dataset needs `streams` (one per domain) or `remote`/`local`')
        streams = {'default': single}
    loader_defaults = {}
    if 'shuffle' in block:
        loader_defaults['shuffle'] = bool(block.pop('shuffle'))
    if 'shuffle_seed' in block:
        loader_defaults['seed'] = int(block.pop('shuffle_seed'))
    shard_options = {key: block.pop(key) for key in DATASET_OPTIONS if key in block}
    ignored = sorted(key for key in block if key in IGNORED_STREAMING_OPTIONS)
    if ignored:
        log.warning('pike_mixture plans its own batches and ignores train_loader.dataset.%s', ', '.join(ignored))
    unknown = sorted(key for key in block if key not in IGNORED_STREAMING_OPTIONS)
    if unknown:
        raise ValueError(f'train_loader.dataset.{unknown[0]}: not an option of the pike_mixture loader')
    sources, proportions = [], {}
    stream_options: dict[str, dict[str, Any]] = {}  # option -> {stream: value}
    for name, stream in dict(streams).items():
        stream = dict(stream)
        unknown = sorted(set(stream) - set(STREAM_KEYS))
        if unknown:
            raise ValueError(f'train_loader.dataset.streams.{name}.{unknown[0]}: not supported by pike_mixture '
                             f'(stream keys: {", ".join(STREAM_KEYS)}; the mixture weights replace repeat/choose)')
        remote, local = stream.get('remote'), stream.get('local')
        if local is None:
            raise ValueError(f'train_loader.dataset.streams.{name}.local is required (where the shards are, or are cached)')
        stream_split = stream.get('split', split)
        if stream_split:
            local = os.path.join(local, stream_split)
            remote = f'{remote.rstrip("/")}/{stream_split}' if remote else None
        sources.append(DomainSource(str(name), str(local), str(remote) if remote else None))
        if 'proportion' in stream:
            proportions[str(name)] = float(stream['proportion'])
        for key in STREAM_SHARD_OPTIONS:
            if key in stream:
                stream_options.setdefault(key, {})[str(name)] = stream[key]
        if 'keep_zip' in stream:
            log.warning('pike_mixture ignores train_loader.dataset.streams.%s.keep_zip', name)
    shard_options.update(one_value_per_option(stream_options, shard_options, [source.name for source in sources]))
    if proportions and len(proportions) != len(sources):
        missing = [s.name for s in sources if s.name not in proportions]
        raise ValueError(f'train_loader.dataset.streams.{missing[0]}.proportion is missing: give every stream one, or none')
    return sources, proportions or None, shard_options, tokens, loader_defaults


def one_value_per_option(stream_options: dict[str, dict[str, Any]], block_options: dict[str, Any],
                         names: list[str]) -> dict[str, Any]:
    """The shard options the streams set, as one value each: the mixture reads every domain with the same.

    Streams that set an option must agree with each other and with the ``dataset`` block; a hash check
    set on some streams must be set on all (a stream written without hashes fails one).
    """
    chosen = {}
    for key, by_stream in stream_options.items():
        values = dict(by_stream)
        if key in block_options:
            values['(the dataset block)'] = block_options[key]
        if len({repr(value) for value in values.values()}) > 1:
            listed = ', '.join(f'{where}: {value!r}' for where, value in values.items())
            raise ValueError(f'train_loader.dataset.streams.*.{key}: pike_mixture reads every domain with one '
                             f'{key}, but the streams set different values ({listed}); set it once in the '
                             'dataset block')
        unset = [name for name in names if name not in by_stream]
        if key == 'validate_hash' and unset and key not in block_options:
            raise ValueError(f'train_loader.dataset.streams.{unset[0]}.validate_hash is not set while other streams '
                             f'set it: pike_mixture checks every domain or none; set it once in the dataset block')
        chosen[key] = next(iter(values.values()))
    return chosen


def _domain_eval_spec(sources: list[DomainSource], domain: str, batch_size: int, tokens: TokenReader,
                      dataset_options: dict[str, Any], num_workers: int) -> DataSpec:
    names = [source.name for source in sources]
    if domain not in names:
        raise ValueError(f"eval_loader.domain: '{domain}' is not a domain of this data (domains: {', '.join(names)})")
    stream_options = {key: value for key, value in dataset_options.items() if key != 'verify_local'}
    loader = build_domain_eval_loader(sources[names.index(domain)], batch_size, domain=names.index(domain),
                                      tokens=tokens, num_workers=num_workers, **stream_options)
    return DataSpec(loader)
