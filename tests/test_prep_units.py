"""Property tests for streaming_prep's pure functions: split, packing, UTF-8 decode policy."""

from __future__ import annotations

import codecs

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_prep.errors import PrepError
from streaming_prep.readers import DecodeStats, decode_utf8
from streaming_prep.writer import pack, split_is_val


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 500), fraction=st.floats(0, 0.99), seed=st.integers(0, 2**32), name=st.text(min_size=1))
def test_split_is_val_counts_and_determinism(n: int, fraction: float, seed: int, name: str):
    is_val = split_is_val(n, fraction, seed, name)
    n_val = int(is_val.sum())
    assert is_val.shape == (n,)
    if fraction > 0 and n >= 2:
        assert 1 <= n_val <= n - 1
        assert abs(n_val - fraction * n) <= 1 or n_val in (1, n - 1)
    else:
        assert n_val == round(fraction * n)
    assert np.array_equal(is_val, split_is_val(n, fraction, seed, name))


def test_split_depends_on_seed_and_domain():
    base = split_is_val(1000, 0.1, 0, "web")
    assert not np.array_equal(base, split_is_val(1000, 0.1, 1, "web"))
    assert not np.array_equal(base, split_is_val(1000, 0.1, 0, "code"))


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), max_size=30), seq_len=st.integers(2, 50))
def test_pack_concatenates_and_drops_only_the_tail(lengths: list[int], seq_len: int):
    documents, start = [], 0
    for length in lengths:
        documents.append(np.arange(start, start + length, dtype=np.uint32))
        start += length
    samples, dropped = pack(documents, seq_len, np.dtype(np.uint32))
    assert samples.shape == (start // seq_len, seq_len) and samples.dtype == np.uint32
    assert np.array_equal(samples.ravel(), np.arange(samples.size))
    assert dropped == start - samples.size < seq_len


def count_replacements(raw: bytes) -> int:
    """How many U+FFFD errors='replace' inserts, counted by a codec error handler."""
    calls = []

    def handler(err: UnicodeDecodeError) -> tuple[str, int]:
        calls.append(err.start)
        return "\ufffd", err.end

    codecs.register_error("pike-test-count", handler)
    raw.decode("utf-8", errors="pike-test-count")
    return len(calls)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=20).map(lambda text: text.encode() + b"\xef\xbf\xbd\xff"))
def test_replace_counts_exactly_the_replaced_sequences(raw: bytes):
    stats = DecodeStats()
    decoded = decode_utf8(raw, "replace", stats, file="f")
    assert decoded == raw.decode("utf-8", errors="replace")
    assert stats.replaced_chars == count_replacements(raw)


def test_decode_policies_on_one_document():
    raw = b"ok \xc3\x28 and \xef\xbf\xbd"
    stats = DecodeStats()
    assert decode_utf8(raw, "replace", stats, file="f") == "ok \ufffd( and \ufffd"
    assert (stats.replaced_chars, stats.skipped_documents) == (1, 0)
    assert decode_utf8(raw, "skip", stats, file="f") is None
    assert stats.skipped_documents == 1
    with pytest.raises(PrepError, match=r"^f: line 7: invalid UTF-8 at byte 3$"):
        decode_utf8(raw, "fail", stats, file="f", where="line 7: ")
