"""Property tests for streaming_prep's pure functions: split, packing, decode policy, message safety,
the known-answer corpora's draws."""

from __future__ import annotations

import codecs
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_prep import known_answers
from streaming_prep.errors import PrepError, redact, safe_line, secret_values
from streaming_prep.readers import DecodeStats, bom_encoding, decode_text
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
    """Invalid sequences and NUL bytes become U+FFFD, each counted once; a genuine U+FFFD is not counted."""
    stats = DecodeStats()
    decoded = decode_text(raw, "replace", stats, file="f")
    assert decoded == raw.decode("utf-8", errors="replace").replace("\0", "\ufffd")
    assert stats.replaced_chars == count_replacements(raw) + raw.count(0)
    valid = decoded == raw.decode("utf-8", errors="ignore")
    assert (decode_text(raw, "skip", stats, file="f") is None) == (not valid)


def test_decode_policies_on_one_document():
    raw = b"ok \xc3\x28 and \xef\xbf\xbd"
    stats = DecodeStats()
    assert decode_text(raw, "replace", stats, file="f") == "ok \ufffd( and \ufffd"
    assert (stats.replaced_chars, stats.skipped_documents) == (1, 0)
    assert decode_text(raw, "skip", stats, file="f") is None
    assert stats.skipped_documents == 1
    with pytest.raises(PrepError, match=r"^f: line 7: invalid UTF-8 at byte 3$"):
        decode_text(raw, "fail", stats, file="f", where="line 7: ")
    with pytest.raises(PrepError, match=r"^f: NUL character at offset 2 \(binary data, or UTF-16/32 without"):
        decode_text(b"ok\0", "fail", stats, file="f")


@pytest.mark.parametrize("codec", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_byte_order_marks_select_the_codec_and_are_dropped(codec: str):
    """With a byte-order mark a document decodes exactly (the mark dropped) under every policy."""
    text = "h\u00e9llo \u6f22\u5b57 \U0001f600"
    explicit_bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
                    "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}
    raw = explicit_bom.get(codec, b"") + text.encode(codec)  # the other codecs write their own mark
    stats = DecodeStats()
    for policy in ("replace", "skip", "fail"):
        assert decode_text(raw, policy, stats, file="f", encoding=bom_encoding(raw)) == text
    assert (stats.replaced_chars, stats.skipped_documents) == (0, 0)
    assert bom_encoding(text.encode()) == "utf-8"


@settings(max_examples=200, deadline=None)
@given(secret=st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#@:\"'<>"),
                      min_size=8, max_size=40),
       before=st.text(max_size=20), after=st.text(max_size=20))
def test_redact_removes_userinfo_and_environment_secrets(secret: str, before: str, after: str):
    redacted = redact(f"{before} https://user:{secret}@host.example:9000/bucket {after}")
    assert f"user:{secret}@" not in redacted and " https://***@host.example:9000/bucket " in redacted
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIKE_TEST_SECRET_ACCESS_KEY", secret)
        patch.setenv("PIKE_TEST_ENDPOINT_URL", f"http://{secret[::-1]}:{secret}@127.0.0.1:1")
        assert {secret, secret[::-1]} <= set(secret_values())
        line = safe_line(f"{before} {secret} {secret[::-1]}:{secret}@127.0.0.1 {after}")
    assert secret not in line and secret[::-1] not in line
    assert line.isprintable()


def test_safe_line_escapes_control_characters_and_undecodable_names():
    assert safe_line("a\nb\tc\x1b\udce9 \u00fc") == "a\\nb\\tc\\x1b\\udce9 \u00fc"
    assert str(PrepError("bad", domain="d\nx", file="/tmp/a\nb.txt")) == "domain 'd\\nx': /tmp/a\\nb.txt: bad"


# ---------------------------------------------------------------------------- known-answer corpora


def test_known_answer_random_split_is_seeded_disjoint_and_fills_every_domain():
    documents = [f"doc{i} " + "x" * (i % 50) for i in range(400)]
    parts = known_answers.random_split(documents, 3, seed=1, cap_bytes=1000)
    assert parts == known_answers.random_split(documents, 3, seed=1, cap_bytes=1000)
    assert parts != known_answers.random_split(documents, 3, seed=2, cap_bytes=1000)
    flat = [text for part in parts for text in part]
    assert len(flat) == len(set(flat)) and set(flat) <= set(documents)
    for part in parts:  # full, and over the cap by less than its last document
        size = sum(len(text) for text in part)
        assert 1000 <= size < 1000 + len(part[-1])
    with pytest.raises(PrepError, match="too small for 3 domains of 100000 bytes"):
        known_answers.random_split(documents, 3, seed=1, cap_bytes=100_000)


def test_known_answer_random_characters_are_printable_and_sized():
    texts = known_answers.random_characters(40_000, seed=1)
    assert texts == known_answers.random_characters(40_000, seed=1)
    assert len(texts) == 3 and {len(t) for t in texts} == {known_answers.RANDOM_DOCUMENT_CHARS}
    assert set("".join(texts)) == set(string.printable)

