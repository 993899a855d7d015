"""Tokenizers: the file-free byte tokenizer (ByT5 ids) and local Hugging Face tokenizer directories.

Both turn a batch of documents into token id arrays, each document followed by EOS.
"""

from __future__ import annotations

import os

import numpy as np

from streaming_prep.errors import PrepError, describe

BYTE_OFFSET = 3  # ByT5: ids 0, 1, 2 are pad, eos, unk; byte b is id b + 3.


class ByteTokenizer:
    """ByT5-compatible byte-level ids (what ``transformers.ByT5Tokenizer()`` gives), no files.

    id = UTF-8 byte + 3, pad = 0, eos = 1, unk = 2, vocab_size = 384 (256 bytes, 3 specials and
    125 extra ids that ByT5 reserves).
    """

    name = "byte"
    vocab_size = 384
    pad_token_id = 0
    eos_token_id = 1
    dtype = np.dtype(np.uint16)

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text followed by EOS."""
        return [self._encode_one(text) for text in texts]

    def _encode_one(self, text: str) -> np.ndarray:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        ids = np.empty(len(raw) + 1, dtype=self.dtype)
        np.add(raw, BYTE_OFFSET, out=ids[:-1], dtype=self.dtype)
        ids[-1] = self.eos_token_id
        return ids


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never downloaded)."""

    def __init__(self, directory: str):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as err:  # transformers raises many types for a bad directory
            raise PrepError(f"cannot load tokenizer: {describe(err)}", file=directory) from None
        if self.tokenizer.eos_token_id is None:
            raise PrepError("tokenizer has no eos token, needed to separate documents", file=directory)
        self.name = directory
        self.vocab_size = len(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        self.dtype = np.dtype(np.uint32 if self.vocab_size > 65535 else np.uint16)

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (no special tokens added) followed by EOS."""
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.array(ids + [self.eos_token_id], dtype=self.dtype) for ids in encoded]


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or the path of a local tokenizer directory."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isdir(spec):
        raise PrepError(f"unknown tokenizer {spec!r}: not 'byte' and not a tokenizer directory")
    return HFTokenizer(spec)
