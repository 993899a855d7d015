"""Documents from each input kind: text files, JSONL (optionally gzipped), Parquet, and
Hugging Face datasets saved with ``Dataset.save_to_disk`` (read as Arrow, no ``datasets``).

A domain's PATH resolves to an ordered list of :class:`Source` files; reading them in that
order gives the domain's documents in a deterministic order.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from streaming_prep.errors import PrepError

TEXT_SUFFIXES = (".txt", ".md")
DECODE_POLICIES = ("replace", "skip", "fail")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Byte-order marks and the codec that decodes (and drops) them; UTF-32 LE before UTF-16 LE, its prefix.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
ENCODING_NAMES = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8", "utf-16": "UTF-16", "utf-32": "UTF-32"}


@dataclass(frozen=True)
class Source:
    """One input file. kind: 'text' (the file is one document), 'jsonl', 'parquet' or 'arrow'."""

    kind: str
    path: str


@dataclass
class DecodeStats:
    """What the decode policy did to a domain: replaced characters, skipped documents."""

    replaced_chars: int = 0
    skipped_documents: int = 0


def resolve_sources(path: str) -> list[Source]:
    """The files behind a domain PATH, in reading order.

    PATH is a directory of .txt/.md files (recursive, sorted), a glob of .txt/.md files,
    a single .txt/.md/.jsonl/.jsonl.gz/.parquet file, or a ``save_to_disk`` dataset directory.
    """
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            raise PrepError("a saved DatasetDict; point at one of its split directories", file=path)
        if all(os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_info.json")):
            return _arrow_dataset_sources(path)
        files = sorted(str(p) for p in Path(path).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise PrepError("no .txt or .md files in this directory", file=path)
        return [Source("text", f) for f in files]
    if os.path.isfile(path):
        return [Source(_file_kind(path), path)]
    if glob.has_magic(path):
        files = sorted(f for f in _glob(path) if f.endswith(TEXT_SUFFIXES) and os.path.isfile(f))
        if not files:
            raise PrepError("no .txt or .md files match this pattern", file=path)
        return [Source("text", f) for f in files]
    raise PrepError("no such file or directory", file=path)


def _glob(pattern: str) -> list[str]:
    """Paths matching a glob pattern. Unlike ``glob.glob``, ``**`` does not descend into symbolic
    links to directories: a link loop would repeat every file below it, exponentially in the
    number of links, until the path got too long."""
    parts = Path(pattern).parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first_magic]) if first_magic else Path()
    return [str(path) for path in root.glob(str(Path(*parts[first_magic:])))]


def _file_kind(path: str) -> str:
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    if path.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    raise PrepError("unsupported file type (expected .txt, .md, .jsonl, .jsonl.gz or .parquet)", file=path)


def _arrow_dataset_sources(directory: str) -> list[Source]:
    """The .arrow files of a ``Dataset.save_to_disk`` directory, in the order state.json lists them."""
    state_path = os.path.join(directory, "state.json")
    try:
        with open(state_path) as f:
            data_files = json.load(f)["_data_files"]
        names = [entry["filename"] for entry in data_files]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise PrepError(f"not a saved Hugging Face dataset state ({err!r})", file=state_path) from None
    for name in names:
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name or "\0" in name:
            raise PrepError(f"data file {name!r} is not a file name in this directory", file=state_path)
    return [Source("arrow", os.path.join(directory, name)) for name in names]


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (as stored, so of the compressed bytes for .gz)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_documents(source: Source, text_field: str, policy: str, stats: DecodeStats) -> Iterator[str]:
    """Yield the documents of one source file, applying the decode policy (counted in stats)."""
    if source.kind == "text":
        with open(source.path, "rb") as f:
            raw = f.read()
        text = decode_text(raw, policy, stats, file=source.path, encoding=bom_encoding(raw))
        if text is not None:
            yield text
    elif source.kind == "jsonl":
        yield from _read_jsonl(source.path, text_field, policy, stats)
    elif source.kind == "parquet":
        parquet = pq.ParquetFile(source.path)
        if text_field not in parquet.schema_arrow.names:
            raise PrepError(f"no column {text_field!r}", file=source.path)
        yield from _arrow_texts(parquet.iter_batches(columns=[text_field]), text_field, source.path, policy, stats)
    else:  # "arrow"
        with pa.memory_map(source.path) as mapped:
            reader = pa.ipc.open_stream(mapped)
            if text_field not in reader.schema.names:
                raise PrepError(f"no column {text_field!r}", file=source.path)
            yield from _arrow_texts(reader, text_field, source.path, policy, stats)


def bom_encoding(raw: bytes) -> str:
    """The codec for bytes that may start with a byte-order mark: UTF-8 unless a mark says otherwise."""
    return next((codec for mark, codec in BYTE_ORDER_MARKS if raw.startswith(mark)), "utf-8")


def decode_text(
    raw: bytes, policy: str, stats: DecodeStats, *, file: str, where: str = "", encoding: str = "utf-8"
) -> str | None:
    """Decode under the policy: 'fail' raises, 'skip' returns None, 'replace' uses U+FFFD.

    Invalid sequences and NUL characters are errors: a NUL marks binary data, or UTF-16/32 text
    without a byte-order mark, which is otherwise valid UTF-8 with a NUL in every other byte.
    Replaced characters are counted as the U+FFFD in the result that were not in the input.
    """
    try:
        text = raw.decode(encoding)
        if "\0" not in text:
            return text
        problem = f"NUL character at offset {text.index(chr(0))} (binary data, or UTF-16/32 without a byte-order mark)"
    except UnicodeDecodeError as err:
        text = None
        problem = f"invalid {ENCODING_NAMES.get(encoding, encoding)} at byte {err.start}"
    if policy == "fail":
        raise PrepError(where + problem, file=file)
    if policy == "skip":
        stats.skipped_documents += 1
        return None
    if text is None:
        text = raw.decode(encoding, errors="replace")
        stats.replaced_chars += text.count("\ufffd") - raw.decode(encoding, errors="ignore").count("\ufffd")
    stats.replaced_chars += text.count("\0")
    return text.replace("\0", "\ufffd")


def _read_jsonl(path: str, text_field: str, policy: str, stats: DecodeStats) -> Iterator[str]:
    """One document per non-blank line: the string in field text_field of a JSON object."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            where = f"line {line_number}: "
            if line_number == 1:
                raw_line = _without_utf8_bom(raw_line, path)
            line = decode_text(raw_line, policy, stats, file=path, where=where)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except RecursionError:
                raise PrepError(f"{where}not valid JSON (nested too deeply)", file=path) from None
            except ValueError as err:
                raise PrepError(f"{where}not valid JSON ({err})", file=path) from None
            if not isinstance(record, dict):
                raise PrepError(f"{where}not a JSON object", file=path)
            if text_field not in record:
                raise PrepError(f"{where}no field {text_field!r}", file=path)
            text = record[text_field]
            if not isinstance(text, str):
                raise PrepError(f"{where}field {text_field!r} is not a string", file=path)
            if "\\u" in line:
                text = _replace_lone_surrogates(text, policy, stats, file=path, where=where)
            if text is not None:
                yield text


def _without_utf8_bom(first_line: bytes, path: str) -> bytes:
    """The first JSONL line without a UTF-8 byte-order mark; a UTF-16/32 mark is an error whatever
    the decode policy, since JSONL is UTF-8 (RFC 8259) and lines cannot be split in those encodings."""
    encoding = bom_encoding(first_line)
    if encoding == "utf-8-sig":
        return first_line[len(codecs.BOM_UTF8) :]
    if encoding != "utf-8":
        name = ENCODING_NAMES[encoding]
        raise PrepError(f"the file is {name} (it starts with a byte-order mark); JSONL must be UTF-8: "
                        f"convert it, e.g. with iconv -f {name} -t UTF-8", file=path)
    return first_line


def _replace_lone_surrogates(text: str, policy: str, stats: DecodeStats, *, file: str, where: str) -> str | None:
    """JSON escapes such as "\\udc80" decode to characters without a UTF-8 form: apply the policy."""
    if not LONE_SURROGATE.search(text):
        return text
    if policy == "fail":
        raise PrepError(f"{where}unpaired surrogate escape, not valid Unicode", file=file)
    if policy == "skip":
        stats.skipped_documents += 1
        return None
    text, count = LONE_SURROGATE.subn("\ufffd", text)
    stats.replaced_chars += count
    return text


def _arrow_texts(
    batches: Iterable[pa.RecordBatch], text_field: str, path: str, policy: str, stats: DecodeStats
) -> Iterator[str]:
    """The texts in column text_field across record batches; nulls and non-text types are errors."""
    row = 0
    for batch in batches:
        column = batch.column(text_field)
        if column.null_count:
            first_null = row + column.is_null().index(True).as_py()
            raise PrepError(f"row {first_null}: column {text_field!r} is null", file=path)
        yield from _column_texts(column, row, text_field, path, policy, stats)
        row += batch.num_rows


def _column_texts(
    column: pa.Array, first_row: int, text_field: str, path: str, policy: str, stats: DecodeStats
) -> list[str]:
    """A string column as it is; a binary column, or a string column holding invalid UTF-8 (Parquet
    does not check), decoded value by value under the policy. Dictionary-encoded columns are decoded first."""
    if pa.types.is_dictionary(column.type):  # e.g. a pandas categorical column
        column = column.dictionary_decode()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            return column.to_pylist()
        except UnicodeDecodeError:
            column = column.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
    elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise PrepError(f"column {text_field!r} has type {kind}, not string or binary", file=path)
    decoded = (
        decode_text(raw, policy, stats, file=path, where=f"row {first_row + i}: ")
        for i, raw in enumerate(column.to_pylist())
    )
    return [text for text in decoded if text is not None]
