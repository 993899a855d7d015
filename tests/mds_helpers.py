"""Small MDS domains for data-path tests, written directly with streaming's MDSWriter.

Sample ``i`` of domain ``d`` holds tokens ``token_value(d, i) + arange(seq_len) % 7`` so a test can
tell from the tokens alone which sample it received.
"""
from __future__ import annotations

import os

import numpy as np
from streaming import MDSWriter


def token_value(domain: int, index: int) -> int:
    return 1000 * (domain + 1) + index


def sample_tokens(domain: int, index: int, seq_len: int) -> np.ndarray:
    return (token_value(domain, index) + np.arange(seq_len) % 7).astype(np.uint16)


def write_domain(out: str, domain: int, num_samples: int, seq_len: int = 16, samples_per_shard: int = 10,
                 hashes: tuple[str, ...] = ('xxh64',), compression: str | None = None,
                 token_encoding: str | None = None) -> str:
    """Write ``num_samples`` samples in shards of about ``samples_per_shard``; return ``out``.

    ``token_encoding``: the ``tokens`` column's MDS encoding, pike-prep's ``ndarray:uint16:<seq_len>``
    by default; ``ndarray:<dtype>`` (llm-foundry's converters: int32) or ``bytes`` (raw int64, as
    older llm-foundry datasets) write the same ids in that form.
    """
    encoding = token_encoding or f'ndarray:uint16:{seq_len}'
    columns = {'tokens': encoding, 'domain': 'str'}
    dtype = np.dtype('int64' if encoding == 'bytes' else encoding.split(':')[1])
    sample_bytes = dtype.itemsize * seq_len + 16
    with MDSWriter(out=out, columns=columns, compression=compression, hashes=list(hashes),
                   size_limit=samples_per_shard * sample_bytes + 64) as writer:
        for i in range(num_samples):
            tokens = sample_tokens(domain, i, seq_len)
            value = tokens.astype(dtype).tobytes() if encoding == 'bytes' else tokens.astype(dtype)
            writer.write({'tokens': value, 'domain': f'd{domain}'})
    return out


def write_domains(root: str, sizes: list[int], **kwargs) -> list[str]:
    """One directory per domain under ``root`` (``root/d0``, ``root/d1``, ...)."""
    return [write_domain(os.path.join(root, f'd{k}'), k, n, **kwargs) for k, n in enumerate(sizes)]
