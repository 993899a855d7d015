"""Hostile inputs for pike-prep and the contract it keeps on them.

Shared by tests/test_hostile.py (inputs drawn by hypothesis) and benchmarks/fault_matrix.py
(inputs drawn from a seeded ``random.Random``). The contract: on any input pike-prep either
converts (exit code 0, nothing on stderr) or exits with code 2 and exactly one line on stderr,
``pike-prep: error: ...``, naming the domain (and the file, when a file is at fault). It never
raises out of ``main`` and never prints a traceback.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import random
import tempfile
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from streaming_prep.cli import PROG, main
from streaming_prep.errors import safe_line
from streaming_prep.readers import DECODE_POLICIES

KINDS = ("txt", "jsonl", "jsonl.gz", "parquet")  # file suffixes of the input kinds that are single files
ERROR_PREFIX = f"{PROG}: error: "
DOMAIN = "hostile"  # the domain name every case is converted under
HUGE_LINE_BYTES = 20 << 20  # "huge line" cases: one line (and one document) this long
Edit = tuple[int, int, bytes]  # (position, bytes deleted, bytes inserted), see mutate()


@dataclass(frozen=True)
class Outcome:
    """What one in-process pike-prep run did: exit code (None if main raised), output, exception."""

    code: int | None
    stdout: str
    stderr: str
    raised: str | None = None


@dataclass(frozen=True)
class NamedCase:
    """A hand-made hostile input: its path and, per decode policy to run it under, the expected
    error (a substring of the error line; "" for any error) or None when it must convert."""

    path: str
    expected: dict[str, str | None]
    seq_len: int = 8


def run_main(argv: Sequence[str]) -> Outcome:
    """Run pike-prep's ``main`` in this process, capturing stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
    except Exception as exc:  # the contract says this never happens: report it, do not crash the caller
        return Outcome(None, out.getvalue(), err.getvalue(), f"{type(exc).__name__}: {exc}")
    return Outcome(code, out.getvalue(), err.getvalue())


def contract_violation(outcome: Outcome, domain: str | None = DOMAIN, file: str | None = None) -> str | None:
    """Why an outcome breaks the contract, or None. A failure must name ``domain`` (unless None)
    and, when given, ``file``."""
    if outcome.raised is not None:
        return f"main raised {outcome.raised}"
    if outcome.code == 0:
        return None if outcome.stderr == "" else f"converted but wrote to stderr: {outcome.stderr[:500]!r}"
    if outcome.code != 2:
        return f"exit code {outcome.code}"
    if outcome.stdout:
        return f"failed but wrote to stdout: {outcome.stdout[:500]!r}"
    line, _, rest = outcome.stderr.partition("\n")
    if rest or not outcome.stderr.endswith("\n") or not line.startswith(ERROR_PREFIX):
        return f"not one error line: {outcome.stderr[:500]!r}"
    if domain is not None and f"domain {domain!r}" not in line:
        return f"error does not name domain {domain!r}: {line[:500]!r}"
    if file is not None and safe_line(file) not in line:
        return f"error does not name file {file!r}: {line[:500]!r}"
    return None


def convert(path: str, out: str, policy: str = "replace", seq_len: int = 8) -> Outcome:
    """pike-prep on one domain, DOMAIN=path, written to out (no val split, one process)."""
    return run_main(["--domain", f"{DOMAIN}={path}", "--out", out, "--seq-len", str(seq_len),
                     "--decode-errors", policy, "--val-fraction", "0", "--workers", "1"])


def encode_corpus(kind: str, texts: Sequence[str]) -> bytes:
    """A valid input file of the given kind holding texts as documents (txt: all of them joined
    into the file's one document). Lone surrogates become invalid UTF-8 (txt), JSON escapes
    (jsonl) or U+FFFD (parquet, which stores only valid strings)."""
    if kind == "txt":
        return "".join(texts).encode("utf-8", "surrogatepass")
    if kind in ("jsonl", "jsonl.gz"):
        data = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
        return gzip.compress(data, mtime=0) if kind == "jsonl.gz" else data
    if kind == "parquet":
        valid = [text.encode("utf-8", "replace").decode("utf-8") for text in texts]
        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": pa.array(valid, type=pa.string())}), buffer)
        return buffer.getvalue()
    raise ValueError(f"unknown kind {kind!r}")


def mutate(data: bytes, edits: Sequence[Edit]) -> bytes:
    """Apply edits in order; each (position, n, inserted) replaces the n bytes at position
    (taken modulo the current length + 1) by inserted."""
    for position, n_deleted, inserted in edits:
        at = position % (len(data) + 1)
        data = data[:at] + inserted + data[at + n_deleted :]
    return data


def check_file_case(kind: str, data: bytes, policy: str, seq_len: int = 8) -> str | None:
    """Write data as one input file of the given kind, convert it, and return the contract
    violation (None when the contract held)."""
    with tempfile.TemporaryDirectory(prefix="pike-hostile-") as root:
        path = os.path.join(root, f"input.{kind}")
        with open(path, "wb") as f:
            f.write(data)
        return contract_violation(convert(path, os.path.join(root, "out"), policy, seq_len))


def random_text(rng: random.Random, max_chars: int = 200) -> str:
    """Text mixing ASCII, Latin-1, CJK, emoji, control characters, NUL and lone surrogates."""
    pools = ("abc xyz\n\t", "éüñ£", "漢字かな", "😀🚀", "\x00\x01\x1b\x7f", "\ud800\udfff", "\\\"{}[]")
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randrange(max_chars)))


def random_case(rng: random.Random) -> tuple[str, bytes, str]:
    """(kind, file bytes, decode policy): a valid file of random texts, then up to 3 random edits."""
    kind = rng.choice(KINDS)
    data = encode_corpus(kind, [random_text(rng) for _ in range(rng.randrange(5))])
    edits = [(rng.randrange(1 << 16), rng.randrange(64), rng.randbytes(rng.randrange(32)))
             for _ in range(rng.randrange(4))]
    return kind, mutate(data, edits), rng.choice(DECODE_POLICIES)


# ---------------------------------------------------------------- hand-made cases


def every_policy(expected: str | None) -> dict[str, str | None]:
    return {policy: expected for policy in DECODE_POLICIES}


def by_policy(replace: str | None, skip: str | None, fail: str | None) -> dict[str, str | None]:
    return {"replace": replace, "skip": skip, "fail": fail}


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _write_repeated(path: Path, head: bytes, chunk: bytes, total: int, tail: bytes = b"") -> str:
    """head, chunk repeated total // len(chunk) times, tail: written chunk by chunk, never whole in memory."""
    with open(path, "wb") as f:
        f.write(head)
        for _ in range(total // len(chunk)):
            f.write(chunk)
        f.write(tail)
    return str(path)


def _parquet(path: Path, column: pa.Array) -> str:
    pq.write_table(pa.table({"text": column}), path, compression="none")
    return str(path)


def write_named_cases(root: Path, huge: bool = True) -> dict[str, NamedCase]:
    """Write every hand-made hostile input under root; name -> case. huge adds the cases with
    HUGE_LINE_BYTES-long lines (run under the default policy only)."""
    text = "plain ASCII text, long enough for a sample or two. " * 4
    jsonl = encode_corpus("jsonl", [text, text])
    gz = gzip.compress(jsonl, mtime=0)
    parquet = encode_corpus("parquet", [text, text])
    latin1 = text.replace("text", "café").encode("latin-1")
    no_docs, short = "no documents", "fewer than seq_len"
    nul = "NUL character at offset"

    def case(name: str, data: bytes, expected: dict[str, str | None]) -> tuple[str, NamedCase]:
        return name, NamedCase(_write(root / name, data), expected)

    def parquet_case(name: str, column: pa.Array, expected: dict[str, str | None]) -> tuple[str, NamedCase]:
        return name, NamedCase(_parquet(root / name, column), expected)

    odd_names = root / "odd_names"
    for name in ("new\nline.txt", "tab\t.txt", "sp ace.txt", "ünï.txt", "-dash.txt", "*star?.txt", "[br].txt",
                 "=eq.txt", "x:y.txt", os.fsdecode(b"caf\xe9.txt"), ".hidden.txt", "a" * 200 + ".txt"):
        _write(odd_names / name, text.encode())
    (root / "empty_dir" / "sub" / "deeper").mkdir(parents=True)
    loop = root / "symlink_loop"
    _write(loop / "doc.txt", text.encode())
    (loop / "self").symlink_to(".")
    (loop / "up").symlink_to("..")
    saved = root / "saved_escape"
    _write(saved / "dataset_info.json", b"{}")
    _write(saved / "state.json", json.dumps({"_data_files": [{"filename": "../escape.arrow"}]}).encode())
    bad_state = root / "saved_bad_state"
    _write(bad_state / "dataset_info.json", b"{}")
    _write(bad_state / "state.json", b"[" * 100_000)

    cases = dict([
        case("random.txt", random.Random(1).randbytes(4096), by_policy(None, no_docs, "invalid UTF-8 at byte")),
        case("random.jsonl", random.Random(2).randbytes(4096), every_policy("")),
        case("random.jsonl.gz", random.Random(3).randbytes(4096), every_policy("cannot read")),
        case("random.parquet", random.Random(4).randbytes(4096), every_policy("cannot read")),
        case("latin1.txt", latin1, by_policy(None, no_docs, f"invalid UTF-8 at byte {latin1.index(0xE9)}")),
        case("cp1252.jsonl", b'{"text": "' + "smart “quotes”".encode("cp1252") + b'"}\n',
             by_policy(None, no_docs, "line 1: invalid UTF-8 at byte 16")),
        case("utf8_bom.txt", codecs.BOM_UTF8 + text.encode(), every_policy(None)),
        case("utf8_bom.jsonl", codecs.BOM_UTF8 + jsonl, every_policy(None)),
        case("utf16_bom.txt", text.encode("utf-16"), every_policy(None)),
        case("utf16_be_bom.txt", codecs.BOM_UTF16_BE + text.encode("utf-16-be"), every_policy(None)),
        case("utf32_bom.txt", text.encode("utf-32"), every_policy(None)),
        case("utf16_bom_odd_length.txt", text.encode("utf-16") + b"x",
             by_policy(None, no_docs, "invalid UTF-16 at byte")),
        case("utf16_no_bom.txt", text.encode("utf-16-le"), by_policy(None, no_docs, nul)),
        case("utf16_bom.jsonl", jsonl.decode().encode("utf-16"), every_policy("JSONL must be UTF-8")),
        case("nul_bytes.txt", b"\0" * 64, by_policy(None, no_docs, nul)),
        case("nul_in_line.jsonl", b'{"text": "a\0b' + text.encode() + b'"}\n', by_policy(None, no_docs, nul)),
        case("empty.txt", b"", every_policy(short)),
        case("empty.jsonl", b"", every_policy(no_docs)),
        case("blank_lines.jsonl", b"\n \n\t\r\n", every_policy(no_docs)),
        case("empty.jsonl.gz", b"", every_policy(no_docs)),
        case("empty_member.jsonl.gz", gzip.compress(b"", mtime=0), every_policy(no_docs)),
        case("empty.parquet", b"", every_policy("cannot read")),
        case("no_rows.parquet", encode_corpus("parquet", []), every_policy(no_docs)),
        case("truncated.jsonl.gz", gz[: len(gz) // 2], every_policy("cannot read")),
        case("bad_crc.jsonl.gz", gz[:-8] + bytes(4) + gz[-4:], every_policy("cannot read")),
        case("trailing_garbage.jsonl.gz", gz + b"garbage!", every_policy("cannot read")),
        case("plain_text.jsonl.gz", jsonl, every_policy("cannot read")),
        case("truncated.parquet", parquet[: len(parquet) // 2], every_policy("cannot read")),
        case("parquet_magic_only.parquet", b"PAR1PAR1", every_policy("cannot read")),
        case("deeply_nested.jsonl", b"[" * 100_000 + b"\n", every_policy("line 1: not valid JSON")),
        case("not_json.jsonl", b"text, not JSON\n", every_policy("line 1: not valid JSON")),
        case("array_line.jsonl", jsonl + b"[1, 2]\n", every_policy("line 3: not a JSON object")),
        case("number_line.jsonl", b"5\n", every_policy("line 1: not a JSON object")),
        case("null_line.jsonl", b"null\n", every_policy("line 1: not a JSON object")),
        case("missing_field.jsonl", b'{"body": "x"}\n', every_policy("line 1: no field 'text'")),
        case("null_text.jsonl", b'{"text": null}\n', every_policy("line 1: field 'text' is not a string")),
        case("list_text.jsonl", b'{"text": ["a"]}\n', every_policy("line 1: field 'text' is not a string")),
        case("object_text.jsonl", b'{"text": {"a": 1}}\n', every_policy("line 1: field 'text' is not a string")),
        case("huge_int.jsonl", b'{"text": ' + b"9" * 5000 + b"}\n", every_policy("line 1: not valid JSON")),
        case("lone_surrogate.jsonl", b'{"text": "\\udc80' + text.encode() + b'"}\n',
             by_policy(None, no_docs, "unpaired surrogate")),
        parquet_case("int_column.parquet", pa.array([1, 2]), every_policy("has type int64, not string or binary")),
        parquet_case("null_row.parquet", pa.array([text, None]), every_policy("row 1: column 'text' is null")),
        parquet_case("dictionary.parquet", pa.array([text, text]).dictionary_encode(), every_policy(None)),
        parquet_case("binary_utf8.parquet", pa.array([text.encode()] * 2, type=pa.binary()), every_policy(None)),
        parquet_case("binary_latin1.parquet", pa.array([b"caf\xe9 " + text.encode()], type=pa.binary()),
                     by_policy(None, no_docs, "row 0: invalid UTF-8 at byte 3")),
        parquet_case("string_invalid_utf8.parquet", _unchecked_strings([text.encode(), b"caf\xe9 bar"]),
                     by_policy(None, None, "row 1: invalid UTF-8 at byte 3")),
        ("odd_file_names", NamedCase(str(odd_names), every_policy(None))),
        ("odd_name_unsupported", NamedCase(_write(root / "odd\nname\x1b.csv", b"a,b"),
                                           every_policy("unsupported file type"))),
        ("empty_dir", NamedCase(str(root / "empty_dir"), every_policy("no .txt or .md files"))),
        ("glob_no_match", NamedCase(str(root / "empty_dir" / "**" / "*.txt"), every_policy("no .txt or .md files"))),
        ("symlink_loop_dir", NamedCase(str(loop), every_policy(None))),
        ("symlink_loop_glob", NamedCase(str(loop / "**" / "*.txt"), every_policy(None))),
        ("saved_dataset_escape", NamedCase(str(saved), every_policy("is not a file name in this directory"))),
        ("saved_dataset_bad_state", NamedCase(str(bad_state), every_policy("not a saved Hugging Face dataset"))),
    ])
    if huge:
        chunk = b"0123456789abcdef" * 4096
        cases["huge_line.txt"] = NamedCase(
            _write_repeated(root / "huge_line.txt", b"", chunk, HUGE_LINE_BYTES), {"replace": None}, 4096)
        cases["huge_line.jsonl"] = NamedCase(
            _write_repeated(root / "huge_line.jsonl", b'{"text": "', chunk, HUGE_LINE_BYTES, b'"}'),
            {"replace": None}, 4096)
        cases["huge_garbage_line.jsonl"] = NamedCase(
            _write_repeated(root / "huge_garbage_line.jsonl", b"{", chunk, HUGE_LINE_BYTES),
            {"replace": "line 1: not valid JSON"}, 4096)
    return cases


def _unchecked_strings(values: list[bytes]) -> pa.Array:
    """A string array holding the given bytes, valid UTF-8 or not (as a careless Parquet writer makes)."""
    return pa.array(values, type=pa.binary()).view(pa.string())


def check_named_case(case: NamedCase, policy: str, out: str) -> str | None:
    """Convert one hand-made case under a policy; the contract violation or unmet expectation, or None."""
    outcome = convert(case.path, out, policy, case.seq_len)
    expected = case.expected[policy]
    violation = contract_violation(outcome, file=None if expected is None else case.path)
    if violation:
        return violation
    if expected is None:
        return None if outcome.code == 0 else f"expected to convert, got {outcome.stderr.strip()!r}"
    if outcome.code != 2 or expected not in outcome.stderr:
        return f"expected an error with {expected!r}, got code {outcome.code}: {outcome.stderr.strip()[:300]!r}"
    return None
