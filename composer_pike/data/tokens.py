"""Token columns: what a sample of a domain must hold, and how it becomes a fixed-length id array.

pike-prep writes ``tokens`` as ``ndarray:uint16:<seq_len>`` (or uint32). llm-foundry's converters
(``convert_dataset_hf``/``convert_dataset_json``/``convert_text_to_mds`` with ``--concat_tokens``)
write ``ndarray:int32`` without a shape, and older datasets store ``tokens`` as raw bytes of int64
(llm-foundry's ``token_encoding_type``). Any integer dtype is read; batches are int64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

TOKEN_ENCODINGS = ('int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64')


def check_token_column(domain: str, shards: Sequence[Any]) -> None:
    """Fail at build time, in one line, when a domain's shards hold text instead of token ids."""
    columns = set()
    for shard in shards:
        columns.update(getattr(shard, 'column_names', []))
    if 'tokens' in columns or not columns:
        return
    if 'text' in columns:
        raise ValueError(f"domain '{domain}': the shards hold a 'text' column and no 'tokens': the mixture loader "
                         'reads token ids; convert them with pike-prep, or with llm-foundry '
                         '(`llmfoundry data_prep convert_dataset_json --concat_tokens <max_seq_len> --tokenizer <dir>`)')
    raise ValueError(f"domain '{domain}': the shards have no 'tokens' column (columns: {sorted(columns)})")


@dataclass(frozen=True)
class TokenReader:
    """Turns a sample's ``tokens`` into an integer id array of the run's sequence length.

    Args:
        max_seq_len: keep the first ``max_seq_len`` ids (llm-foundry's ``dataset.max_seq_len``); a
            sample with fewer fails, since the loader trains on full-length samples only. ``None``
            keeps the sample as written (pike-prep's fixed-shape columns).
        token_encoding_type: dtype of ``tokens`` stored as raw bytes (llm-foundry's default: int64).
    """
    max_seq_len: int | None = None
    token_encoding_type: str = 'int64'

    def __post_init__(self) -> None:
        if self.token_encoding_type not in TOKEN_ENCODINGS:
            raise ValueError(f'token_encoding_type {self.token_encoding_type!r} is not one of {list(TOKEN_ENCODINGS)}')
        if self.max_seq_len is not None and int(self.max_seq_len) < 1:
            raise ValueError(f'max_seq_len must be a positive number of tokens, got {self.max_seq_len}')

    def __call__(self, sample: dict[str, Any], domain: str, index: int) -> np.ndarray:
        if 'tokens' not in sample:
            raise KeyError(f"domain '{domain}': samples have no 'tokens' column (columns: {sorted(sample)})")
        tokens = sample['tokens']
        if isinstance(tokens, (bytes, bytearray, memoryview)):
            tokens = np.frombuffer(tokens, dtype=self.token_encoding_type)
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in 'iu':
            raise TypeError(f"domain '{domain}': sample {index} has tokens of dtype {tokens.dtype}, not integers")
        if self.max_seq_len is None:
            return tokens
        if len(tokens) < self.max_seq_len:
            raise ValueError(f"domain '{domain}': sample {index} has {len(tokens)} tokens, fewer than max_seq_len "
                             f'{self.max_seq_len}; the mixture loader trains on full-length samples only (convert '
                             f'with --concat_tokens {self.max_seq_len})')
        return tokens[:self.max_seq_len]
