"""The mixture data path: one StreamingDataset with a Stream per domain, batches planned by :class:`MixturePlanner`.

Layout of the pieces (all in the main process unless stated):

* :class:`MixtureDataset` - map-style dataset over one StreamingDataset holding one Stream per
  domain (each with its own local cache directory); item ``(domain, index)`` reads one packed
  sequence by random access (in DataLoader workers). It is also the handle the PiKE algorithm and
  Composer talk to: ``set_weights``, ``state_dict``/``load_state_dict``, ``probe_batch`` (which reads
  each domain in a probe order of its own, :class:`composer_pike.data.probe_order.ProbeOrder`).
* :class:`MixtureBatchSampler` - asks the planner for global batches, keeps a snapshot of the
  planner before every planned step, and yields this rank's slice.
* :class:`MixtureDataLoader` - a DataLoader that counts the batches it has handed to the trainer,
  so the sampler knows which planned-but-unused batches to replan after an interrupted iteration
  and which snapshot a checkpoint must hold.

Effective-step rule: weights passed to ``set_weights(w, after_step=t)`` are used from global step
``t + 1 + delay`` on. ``delay`` must be at least the loader's look-ahead (``num_workers *
prefetch_factor`` batches are planned before the trainer asks for them); this is checked when the
loader is built, so the rule never depends on timing.

Modules, each importing only those above it: :mod:`.manifest`, :mod:`.shared_memory`, :mod:`.streams`,
:mod:`.tokens`, :mod:`.dataset`, :mod:`.evaluation`, :mod:`.prefetch`, :mod:`.sampler`, :mod:`.loader`.
:func:`build_domain_eval_loader` (:mod:`.evaluation`) is the held-out side: one plain pass per domain.
"""
from composer_pike.data.dataset import MixtureDataset, collate_samples
from composer_pike.data.evaluation import DomainSplit, build_domain_eval_loader
from composer_pike.data.loader import MixtureDataLoader, build_mixture_dataloader, loader_lookahead
from composer_pike.data.manifest import (MANIFEST_NAME, DomainSource, manifest_sources, read_manifest,
                                         sources_from_manifest)
from composer_pike.data.prefetch import ShardPrefetcher
from composer_pike.data.sampler import MixtureBatchSampler
from composer_pike.data.shared_memory import open_streaming_dataset
from composer_pike.data.streams import VerifiedStream, verify_local_shards
from composer_pike.data.tokens import TokenReader

__all__ = ['MANIFEST_NAME', 'DomainSource', 'DomainSplit', 'MixtureBatchSampler', 'MixtureDataLoader', 'MixtureDataset',
           'ShardPrefetcher', 'TokenReader', 'VerifiedStream', 'build_domain_eval_loader', 'build_mixture_dataloader',
           'collate_samples', 'loader_lookahead', 'manifest_sources', 'open_streaming_dataset', 'read_manifest',
           'sources_from_manifest', 'verify_local_shards']
