"""prepare(): corpora -> tokenized, packed MDS shards per domain and split, plus manifest.json.

Each domain is processed by one worker (read, tokenize, split, pack, write); domains run in
parallel processes. A worker holds its domain's tokens in memory (with the byte tokenizer,
about 4 bytes per input byte at the peak), so split very large corpora into several domains
or runs. Local output is built in a temporary sibling directory and renamed into
place only when everything succeeded. Remote output (s3://, gs://, ...) is uploaded by
streaming's uploaders shard by shard, with manifest.json uploaded last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from streaming.base.compression import is_compression
from streaming.base.hashing import is_hash
from streaming.base.storage.upload import CloudUploader
from streaming.base.util import bytes_to_int
from tqdm import tqdm

from streaming_prep.errors import PrepError, describe, has_userinfo, redact
from streaming_prep.readers import DECODE_POLICIES, DecodeStats, Source, file_sha256, read_documents, resolve_sources
from streaming_prep.tokenizers import Tokenizer, load_tokenizer
from streaming_prep.writer import pack, split_is_val, write_split

MANIFEST_FORMAT = "composer-pike-manifest/1"
MANIFEST_NAME = "manifest.json"
DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_DOMAIN_NAME_CHARS = 128  # a directory name, also inside the loader's cache directories
TOKENIZE_BATCH_BYTES = 4 << 20  # documents are tokenized in batches of about this many bytes
DOMAIN_KEYS = ("path", "text_field")
BuildOutput = Callable[[str, "str | None"], dict]  # (local root, remote root or None) -> manifest


@dataclass(frozen=True)
class Settings:
    """Options shared by every domain, already checked."""

    tokenizer: str
    seq_len: int
    val_fraction: float
    seed: int
    compression: str | None
    hashes: list[str]
    size_limit: int
    decode_errors: str
    progress: bool


@dataclass(frozen=True)
class DomainJob:
    """Everything one worker process needs to convert one domain."""

    name: str
    path: str  # as given by the user
    text_field: str
    sources: list[Source]
    local_dir: str  # where this domain's splits are written (staging)
    remote_dir: str | None  # where they are uploaded, if the output is remote
    position: int  # progress bar row
    settings: Settings


def prepare(
    domains: Mapping[str, str | Mapping[str, str]],
    out: str,
    *,
    tokenizer: str = "byte",
    seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 0,
    compression: str | None = "zstd",
    hashes: Sequence[str] | str = ("xxh64",),
    size_limit: int | str = 1 << 26,
    text_field: str = "text",
    decode_errors: str = "replace",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert each domain's corpus into MDS shards under out/<domain>/{train,val}; return the manifest.

    domains maps a name to a PATH (see readers.resolve_sources) or to {"path": ..., "text_field": ...}.
    out is a local directory or a remote URL (s3://bucket/prefix, gs://...). seq_len is in
    tokens, size_limit in bytes per shard (before compression); hashes is a list or a
    comma-separated string of streaming's hash names. val_fraction of each domain's
    documents (chosen by seed) go to the val split; with 0 there is no val split.
    workers defaults to min(number of domains, CPU count). progress shows a bar per domain
    when stderr is a terminal. Raises PrepError for anything the user has to fix.
    """
    settings = _check_settings(
        tokenizer, seq_len, val_fraction, seed, compression, hashes, size_limit, decode_errors, progress
    )
    specs = _check_domains(domains, text_field)
    remote = _check_out(out, overwrite)
    loaded_tokenizer = load_tokenizer(tokenizer)
    sources = {}
    for name, (path, _) in specs.items():
        try:
            sources[name] = resolve_sources(path)
        except PrepError as err:
            raise err.in_domain(name) from None
        except OSError as err:
            raise PrepError(f"cannot read: {describe(err)}", domain=name, file=path) from None
    workers = min(len(specs), os.cpu_count() or 1) if workers is None else workers
    if not _is_int(workers) or workers < 1:
        raise PrepError(f"workers must be an integer of at least 1 (got {workers!r})")

    def build(local_root: str, remote_root: str | None) -> dict:
        """Run every domain into local_root (uploading to remote_root); write and return the manifest."""
        jobs = [
            DomainJob(
                name=name,
                path=path,
                text_field=field,
                sources=sources[name],
                local_dir=os.path.join(local_root, name),
                remote_dir=f"{remote_root}/{name}" if remote_root else None,
                position=position,
                settings=settings,
            )
            for position, (name, (path, field)) in enumerate(specs.items())
        ]
        entries = _run_domains(jobs, workers)
        manifest = _manifest(settings, loaded_tokenizer, {name: entries[name] for name in specs})
        with open(os.path.join(local_root, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        return manifest

    if remote:
        return _prepare_remote(out.rstrip("/"), overwrite, build)
    return _prepare_local(out, overwrite, build)


def _check_out(out: str, overwrite: bool) -> bool:
    """Check the output location and flag; return whether it is remote (a URL)."""
    if not isinstance(out, str) or not out or "\0" in out:
        raise PrepError(f"out must be a directory or a URL (got {out!r})")
    if not isinstance(overwrite, bool):
        raise PrepError(f"overwrite must be true or false (got {overwrite!r})")
    remote = "://" in out
    if remote and has_userinfo(out):
        raise PrepError(
            "credentials in the URL are not supported; give them to the object store's client "
            "(for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials)",
            file=out,
        )
    return remote


def _is_int(value: object) -> bool:
    """An int that is not a bool (YAML's true/false are bools, which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _manifest(settings: Settings, tokenizer: Tokenizer, domains: dict[str, dict]) -> dict:
    """The manifest.json object (format composer-pike-manifest/1); split paths are relative to it."""
    return {
        "format": MANIFEST_FORMAT,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "val_fraction": settings.val_fraction,
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "dtype": tokenizer.dtype.name,
        "compression": settings.compression,
        "hashes": settings.hashes,
        "domains": domains,
    }


def _check_settings(
    tokenizer: str,
    seq_len: int,
    val_fraction: float,
    seed: int,
    compression: str | None,
    hashes: Sequence[str] | str,
    size_limit: int | str,
    decode_errors: str,
    progress: bool,
) -> Settings:
    if not isinstance(tokenizer, str):
        raise PrepError(f"tokenizer must be 'byte' or a tokenizer directory (got {tokenizer!r})")
    if not _is_int(seq_len) or seq_len < 2:
        raise PrepError(f"seq_len must be an integer of at least 2 (got {seq_len!r})")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise PrepError(f"val_fraction must be a number in [0, 1) (got {val_fraction!r})")
    if not _is_int(seed) or seed < 0:
        raise PrepError(f"seed must be a non-negative integer (got {seed!r})")
    if not isinstance(decode_errors, str) or decode_errors not in DECODE_POLICIES:
        raise PrepError(f"decode_errors must be one of {', '.join(DECODE_POLICIES)} (got {decode_errors!r})")
    if compression in (None, "", "none"):
        compression = None
    elif not isinstance(compression, str) or not is_compression(compression):
        raise PrepError(f"unknown compression {compression!r}")
    if isinstance(hashes, str):
        hashes = hashes.split(",")
    if not isinstance(hashes, Sequence) or not all(isinstance(algorithm, str) for algorithm in hashes):
        raise PrepError(f"hashes must be a list of hash names or a comma-separated string (got {hashes!r})")
    hashes = sorted(set(hashes) - {"none", ""})
    for algorithm in hashes:
        if not is_hash(algorithm):
            raise PrepError(f"unknown hash {algorithm!r}")
    try:
        if not (_is_int(size_limit) or isinstance(size_limit, str)):
            raise ValueError(size_limit)
        size_limit = bytes_to_int(size_limit)
    except (ValueError, OverflowError):  # OverflowError: "infmb"
        raise PrepError(f"size_limit must be a number of bytes like 67108864 or 64mb (got {size_limit!r})") from None
    if not 0 < size_limit < 2**32:
        raise PrepError(f"size_limit must be between 1 and 2**32 - 1 bytes (got {size_limit})")
    return Settings(
        tokenizer, seq_len, float(val_fraction), seed, compression, hashes, size_limit, decode_errors, progress
    )


def _check_domains(domains: Mapping[str, str | Mapping[str, str]], text_field: str) -> dict[str, tuple[str, str]]:
    """name -> (path, text_field), with names safe to use as directory names."""
    if not domains:
        raise PrepError("no domains given (use --domain NAME=PATH or a config file)")
    if not isinstance(text_field, str):
        raise PrepError(f"text_field must be a string (got {text_field!r})")
    specs = {}
    for name, spec in domains.items():
        if not is_valid_domain_name(name):
            raise PrepError(
                f"invalid domain name {name!r}: use at most {MAX_DOMAIN_NAME_CHARS} letters, digits, '_', '.' "
                "and '-', starting with a letter or digit"
            )
        if isinstance(spec, str):
            specs[name] = (spec, text_field)
            continue
        if not isinstance(spec, Mapping):
            raise PrepError(f"expected a PATH or keys {', '.join(DOMAIN_KEYS)} (got {spec!r})", domain=name)
        unknown = [key for key in spec if key not in DOMAIN_KEYS]
        if unknown:
            raise PrepError(f"unknown key {unknown[0]!r} (expected {', '.join(DOMAIN_KEYS)})", domain=name)
        if not isinstance(spec.get("path"), str):
            raise PrepError("missing 'path'", domain=name)
        if not isinstance(spec.get("text_field", text_field), str):
            raise PrepError(f"text_field must be a string (got {spec['text_field']!r})", domain=name)
        specs[name] = (spec["path"], spec.get("text_field", text_field))
    return specs


def is_valid_domain_name(name: object) -> bool:
    """Whether name is safe as a directory name under the output: it cannot be empty, '.', '..',
    hold a path separator or NUL, or start with '.' or '-'."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_DOMAIN_NAME_CHARS
        and DOMAIN_NAME.fullmatch(name) is not None
        and name != MANIFEST_NAME
    )


def _prepare_local(out: str, overwrite: bool, build: BuildOutput) -> dict:
    """Build into out.tmp-<random> beside out, then rename it to out (replacing it if allowed).

    Only an earlier pike-prep output (a directory with manifest.json) is ever replaced, so a
    mistyped --out with --overwrite cannot delete, say, the current directory.
    """
    final = os.path.abspath(out)
    if os.path.lexists(final) and not _is_empty_dir(final):
        if not overwrite:
            raise PrepError("output exists and is not empty (pass --overwrite to replace it)", file=out)
        if not os.path.isfile(os.path.join(final, MANIFEST_NAME)):
            raise PrepError(f"output exists and is not a pike-prep output (no {MANIFEST_NAME}); "
                            "refusing to replace it", file=out)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    os.mkdir(staging)  # not mkdtemp: that makes the directory private (mode 0700)
    try:
        manifest = build(staging, None)
        if os.path.lexists(final):
            aside = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
            os.rename(staging, final)
            _remove(aside)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _prepare_remote(remote: str, overwrite: bool, build: BuildOutput) -> dict:
    """Stage locally, let each split's writer upload its shards, then upload manifest.json."""
    staging = tempfile.mkdtemp(prefix="pike-prep-")
    try:
        try:
            uploader = CloudUploader.get((staging, remote))
        except Exception as err:  # each cloud SDK raises its own types (missing bucket, credentials)
            raise PrepError(f"cannot write here: {describe(err)}", file=remote) from None
        try:
            existing = uploader.list_objects()
        except NotImplementedError:  # not every uploader can list
            if not overwrite:
                message = "cannot list this location to check that it is empty (pass --overwrite)"
                raise PrepError(message, file=remote) from None
            existing = []
        except Exception as err:
            raise PrepError(f"cannot list: {describe(err)}", file=remote) from None
        if existing and not overwrite:
            raise PrepError("output exists and is not empty (pass --overwrite to replace it)", file=remote)
        manifest = build(staging, remote)
        try:
            uploader.upload_file(MANIFEST_NAME)
        except Exception as err:
            raise PrepError(f"uploading {MANIFEST_NAME} failed: {describe(err)}", file=remote) from None
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_domains(jobs: list[DomainJob], workers: int) -> dict[str, dict]:
    """Process every domain, in worker processes when workers > 1; name -> manifest entry."""
    if workers == 1 or len(jobs) == 1:
        return {job.name: process_domain(job) for job in jobs}
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        futures = {job.name: pool.submit(process_domain, job) for job in jobs}
        wait(futures.values(), return_when=FIRST_EXCEPTION)
        failed = [future for future in futures.values() if future.done() and future.exception()]
        if failed:
            for future in futures.values():
                future.cancel()
            raise failed[0].exception()
        return {name: future.result() for name, future in futures.items()}


def process_domain(job: DomainJob) -> dict:
    """Read, tokenize, split, pack and write one domain; return its manifest entry."""
    try:
        return _process_domain(job)
    except PrepError as err:
        raise err.in_domain(job.name) from None
    except OSError as err:  # writing the output (disk full, ...) or a source changed while read
        raise PrepError(describe(err), domain=job.name) from None


def _process_domain(job: DomainJob) -> dict:
    settings = job.settings
    tokenizer = load_tokenizer(settings.tokenizer)
    stats = DecodeStats()
    documents: list[np.ndarray] = []  # token ids per document, each ending with EOS
    text_bytes = 0
    hide_bar = None if settings.progress else True  # None: tqdm shows the bar only on a terminal
    with tqdm(desc=job.name, unit="B", unit_scale=True, position=job.position, disable=hide_bar) as bar:
        for batch in _batches(_domain_texts(job, stats)):
            documents.extend(tokenizer.encode_documents(batch))
            batch_bytes = sum(len(text.encode("utf-8")) for text in batch)
            text_bytes += batch_bytes
            bar.update(batch_bytes)
            bar.set_postfix(docs=len(documents), refresh=False)
    if not documents:
        raise PrepError("no documents", file=job.path)

    is_val = split_is_val(len(documents), settings.val_fraction, settings.seed, job.name)
    split_documents = {"train": [doc for doc, val in zip(documents, is_val) if not val]}
    if settings.val_fraction > 0:
        split_documents["val"] = [doc for doc, val in zip(documents, is_val) if val]
    del documents

    splits = {}
    for split, docs in split_documents.items():
        samples, dropped = pack(docs, settings.seq_len, tokenizer.dtype)
        if split == "train" and len(samples) == 0:
            raise PrepError(
                f"the train split has {dropped} tokens, fewer than seq_len {settings.seq_len}", file=job.path
            )
        local = os.path.join(job.local_dir, split)
        write_split(
            (local, f"{job.remote_dir}/{split}") if job.remote_dir else local,
            samples,
            job.name,
            compression=settings.compression,
            hashes=settings.hashes,
            size_limit=settings.size_limit,
        )
        splits[split] = {
            "path": f"{job.name}/{split}",
            "samples": len(samples),
            "tokens": samples.size,
            "documents": len(docs),
            "dropped_tokens": dropped,
        }
    return {
        "splits": splits,
        "documents": sum(split["documents"] for split in splits.values()),
        "bytes": text_bytes,
        "decode_errors": {
            "policy": settings.decode_errors,
            "replaced_chars": stats.replaced_chars,
            "skipped_documents": stats.skipped_documents,
        },
        "sources": [
            {"path": redact(source.path), "bytes": os.path.getsize(source.path), "sha256": file_sha256(source.path)}
            for source in job.sources
        ],
    }


def _domain_texts(job: DomainJob, stats: DecodeStats) -> Iterator[str]:
    """All documents of a domain in order, with read errors turned into PrepError naming the file."""
    for source in job.sources:
        try:
            yield from read_documents(source, job.text_field, job.settings.decode_errors, stats)
        except (OSError, EOFError, zlib.error, pa.ArrowException) as err:  # EOFError: truncated gzip
            raise PrepError(f"cannot read: {describe(err)}", file=source.path) from None


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    """Group documents into lists of about TOKENIZE_BATCH_BYTES characters."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= TOKENIZE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
