"""Held-out evaluation: one plain pass over one domain's split, unweighted, each sample once.

An evaluation loader must not go through the mixture planner: weighted batches would repeat a
small domain's samples and mix the domains' losses. Each domain gets its own loader, so Composer
reports its loss under its own evaluator label.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from composer_pike.data.dataset import collate_samples
from composer_pike.data.manifest import DomainSource
from composer_pike.data.shared_memory import open_streaming_dataset
from composer_pike.data.streams import VerifiedStream
from composer_pike.data.tokens import TokenReader


class DomainSplit(IterableDataset):
    """A domain's StreamingDataset as ``(domain, index, tokens)`` items for :func:`collate_samples`.

    Iterates in the dataset's order, this rank's share of it (StreamingDataset partitions the
    samples over ranks and DataLoader workers).
    """

    def __init__(self, dataset: Any, domain: int, name: str, tokens: TokenReader) -> None:
        self.dataset = dataset
        self.domain = domain
        self.name = name
        self.tokens = tokens

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for index, sample in enumerate(self.dataset):
            yield self.domain, index, self.tokens(sample, self.name, index)

    def __len__(self) -> int:
        return len(self.dataset)


def build_domain_eval_loader(source: DomainSource, batch_size: int, *, domain: int = 0,
                             tokens: TokenReader = TokenReader(), num_workers: int = 0,
                             **stream_options: Any) -> DataLoader:
    """A DataLoader making one pass over ``source`` in batches of ``batch_size`` samples per rank.

    ``domain`` is the id the batches carry in ``batch['domain']``; ``stream_options`` go to the
    :class:`VerifiedStream` (``validate_hash``, ``download_retry``, ``download_timeout``).
    """
    def make_streams() -> list[VerifiedStream]:
        return [VerifiedStream(remote=source.remote, local=source.local, **stream_options)]

    dataset = open_streaming_dataset(make_streams, shuffle=False, batch_size=batch_size)
    return DataLoader(DomainSplit(dataset, domain, source.name, tokens), batch_size=batch_size,
                      collate_fn=collate_samples, num_workers=num_workers)
