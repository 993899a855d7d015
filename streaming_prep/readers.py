"""Documents from each input kind: text files, JSONL (optionally gzipped), Parquet, and
Hugging Face datasets saved with ``Dataset.save_to_disk`` (read as Arrow, no ``datasets``).

A domain's PATH resolves to an ordered list of :class:`Source` files; reading them in that
order gives the domain's documents in a deterministic order.
"""

from __future__ import annotations

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
REPLACEMENT_CHAR_UTF8 = "\ufffd".encode("utf-8")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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
        files = sorted(f for f in glob.glob(path, recursive=True) if f.endswith(TEXT_SUFFIXES) and os.path.isfile(f))
        if not files:
            raise PrepError("no .txt or .md files match this pattern", file=path)
        return [Source("text", f) for f in files]
    raise PrepError("no such file or directory", file=path)


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
        return [Source("arrow", os.path.join(directory, entry["filename"])) for entry in data_files]
    except (ValueError, KeyError, TypeError) as err:
        raise PrepError(f"not a saved Hugging Face dataset state ({err!r})", file=state_path) from None


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
            text = decode_utf8(f.read(), policy, stats, file=source.path)
        if text is not None:
            yield text
    elif source.kind == "jsonl":
        yield from _read_jsonl(source.path, text_field, policy, stats)
    elif source.kind == "parquet":
        parquet = pq.ParquetFile(source.path)
        if text_field not in parquet.schema_arrow.names:
            raise PrepError(f"no column {text_field!r}", file=source.path)
        yield from _arrow_texts(parquet.iter_batches(columns=[text_field]), text_field, source.path)
    else:  # "arrow"
        with pa.memory_map(source.path) as mapped:
            reader = pa.ipc.open_stream(mapped)
            if text_field not in reader.schema.names:
                raise PrepError(f"no column {text_field!r}", file=source.path)
            yield from _arrow_texts(reader, text_field, source.path)


def decode_utf8(raw: bytes, policy: str, stats: DecodeStats, *, file: str, where: str = "") -> str | None:
    """Decode UTF-8 under the policy: 'fail' raises, 'skip' returns None, 'replace' uses U+FFFD.

    Replaced characters are counted as the U+FFFD in the result that were not in the input.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if policy == "fail":
            raise PrepError(f"{where}invalid UTF-8 at byte {err.start}", file=file) from None
        if policy == "skip":
            stats.skipped_documents += 1
            return None
        text = raw.decode("utf-8", errors="replace")
        stats.replaced_chars += text.count("\ufffd") - raw.count(REPLACEMENT_CHAR_UTF8)
        return text


def _read_jsonl(path: str, text_field: str, policy: str, stats: DecodeStats) -> Iterator[str]:
    """One document per non-blank line: the string in field text_field of a JSON object."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            where = f"line {line_number}: "
            line = decode_utf8(raw_line, policy, stats, file=path, where=where)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
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


def _arrow_texts(batches: Iterable[pa.RecordBatch], text_field: str, path: str) -> Iterator[str]:
    """The strings of column text_field across record batches; nulls and non-strings are errors."""
    row = 0
    for batch in batches:
        column = batch.column(text_field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise PrepError(f"column {text_field!r} has type {column.type}, not string", file=path)
        if column.null_count:
            first_null = row + column.is_null().index(True).as_py()
            raise PrepError(f"row {first_null}: column {text_field!r} is null", file=path)
        yield from column.to_pylist()
        row += batch.num_rows
