"""Command line: ``pike-prep --domain NAME=PATH ... --out DIR`` (or ``--config prep.yaml``).

Options come from, lowest priority first: prepare()'s defaults, the YAML config, the flags.
Domains from --domain flags are added to (or replace same-named) domains from the config.
Every user error is one line on stderr and exit code 2; every printed line goes through
errors.safe_line (no credentials, no control characters).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

from streaming_prep.errors import PrepError, describe, safe_line
from streaming_prep.pipeline import prepare
from streaming_prep.readers import DECODE_POLICIES

PROG = "pike-prep"
OPTION_KEYS = (
    "out", "tokenizer", "seq_len", "val_fraction", "seed", "compression", "hashes",
    "size_limit", "text_field", "decode_errors", "workers", "overwrite",
)
CONFIG_KEYS = (*OPTION_KEYS, "domains")


class OneLineParser(argparse.ArgumentParser):
    """Reports argument errors as PrepError, so they print as one line like every other error."""

    def error(self, message: str) -> None:
        raise PrepError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Convert per-domain text corpora into tokenized, packed MDS shards plus manifest.json.",
    )
    add = parser.add_argument
    add("--domain", action="append", metavar="NAME=PATH",
        help="a domain: PATH is a directory or glob of .txt/.md files, a .jsonl/.jsonl.gz/.parquet file, "
             "or a directory written by datasets' save_to_disk (repeatable)")
    add("--out", help="output directory, or a remote URL such as s3://bucket/prefix")
    add("--config", metavar="FILE.yaml", help=f"YAML with keys {', '.join(CONFIG_KEYS)}; flags override it")
    add("--tokenizer", help="'byte' (ByT5 byte ids, the default) or a local Hugging Face tokenizer directory")
    add("--seq-len", type=int, help="tokens per sample (default 256)")
    add("--val-fraction", type=float, help="fraction of each domain's documents for the val split (default 0.05)")
    add("--seed", type=int, help="seed for the train/val split (default 0)")
    add("--compression", help="shard compression: zstd (default), none, or another streaming codec such as zstd:7")
    add("--hashes", help="comma-separated shard hashes (default xxh64; 'none' for no hashes)")
    add("--size-limit", help="shard size limit in bytes before compression, e.g. 67108864 or 64mb (default)")
    add("--text-field", help="JSONL field / Parquet or Arrow column holding the text (default 'text')")
    add("--decode-errors", choices=DECODE_POLICIES,
        help="invalid UTF-8: replace with U+FFFD (default), skip the document, or fail")
    add("--workers", type=int, help="parallel processes (default: min(number of domains, CPU count))")
    add("--overwrite", action="store_true", default=None, help="replace a non-empty output location")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run pike-prep; return the exit code (0, or 2 for a user error)."""
    try:
        manifest, out = run(argv)
    except PrepError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: {safe_line(describe(err))}", file=sys.stderr)
        return 2
    for name, domain in manifest["domains"].items():
        print(summary_line(name, domain))
    print(f"wrote {safe_line(out)}")
    return 0


def summary_line(name: str, domain: dict) -> str:
    """One domain's manifest entry as one line, with what the decode policy did."""
    counts = ", ".join(f"{split} {info['samples']} samples" for split, info in domain["splits"].items())
    line = f"{name}: {domain['documents']} documents, {domain['bytes']} bytes -> {counts}"
    decode = domain["decode_errors"]
    if decode["replaced_chars"]:
        line += f"; {decode['replaced_chars']} invalid characters replaced by U+FFFD"
    if decode["skipped_documents"]:
        line += f"; {decode['skipped_documents']} documents with invalid text skipped"
    return line


def run(argv: Sequence[str] | None) -> tuple[dict, str]:
    """Parse flags and config, then prepare(); returns (manifest, output location)."""
    args = build_parser().parse_args(argv)
    config = load_config(args.config) if args.config else {}
    domains = dict(config.pop("domains", None) or {})
    domains.update(parse_domain_flags(args.domain or []))
    options = {**config, **{key: getattr(args, key) for key in OPTION_KEYS if getattr(args, key) is not None}}
    out = options.pop("out", None)
    if not out:
        raise PrepError("no output location (use --out or 'out' in the config)")
    return prepare(domains, out, **options), out


def parse_domain_flags(flags: Sequence[str]) -> dict[str, str]:
    """['NAME=PATH', ...] -> {NAME: PATH}; names must be unique."""
    domains: dict[str, str] = {}
    for flag in flags:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise PrepError(f"--domain {flag!r}: expected NAME=PATH")
        if name in domains:
            raise PrepError(f"--domain {flag!r}: domain {name!r} given twice")
        domains[name] = path
    return domains


def load_config(path: str) -> dict:
    """The YAML config as a plain dict, refusing unknown keys."""
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except FileNotFoundError:
        raise PrepError("no such config file", file=path) from None
    except Exception as err:  # yaml and omegaconf parse errors have many types
        raise PrepError(f"cannot parse config: {describe(err)}", file=path) from None
    if not isinstance(config, dict):
        raise PrepError("config must be a mapping of keys to values", file=path)
    for key in config:
        if key not in CONFIG_KEYS:
            raise PrepError(f"unknown key {key!r} (expected one of {', '.join(CONFIG_KEYS)})", file=path)
    if not isinstance(config.get("domains", {}), dict):
        raise PrepError("'domains' must map names to paths", file=path)
    return config
