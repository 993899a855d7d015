"""Known-answer corpora: mixtures whose right weights are known before training, from text every
Python installation has (no network).

    null        one corpus split at random into 4 domains: nothing to prefer, weights must stay uniform
    planted     three random thirds of the same corpus plus one domain of uniformly random printable
                characters (nothing to learn beyond the unigram distribution): it must sink
    duplicates  one domain written twice under two names (copy_a, copy_b: the same shards) beside C
                headers and pydoc topics: the copies must keep equal weights

The text corpus is the standard library's .py files of 512 B to 64 KiB (sorted path order), each
file given to a domain by a seeded draw until every domain holds ``DOMAIN_BYTES`` of UTF-8 text; the
same installation always gives the same corpora. tests/test_known_answers_e2e.py trains on them, and
``benchmarks/mixing_quality.py --data`` compares policies on them.

    python -m streaming_prep.known_answers planted --out DIR [--seq-len 128] [--val-fraction 0.02]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import string
import sys
import tempfile
from pathlib import Path

from streaming_prep.demo import _header_sources, _pydoc_sources, _stdlib_sources, build_and_report
from streaming_prep.errors import PrepError
from streaming_prep.pipeline import MANIFEST_NAME, prepare

DOMAIN_BYTES = 1 << 20  # UTF-8 text per domain
MAX_DOCUMENT_BYTES = 64 << 10  # leave out the few huge stdlib files, so a random draw mixes the domains well
MIN_DOCUMENT_BYTES = 512  # and the near-empty ones (__init__.py), so every val split holds a full sample
RANDOM_DOCUMENT_CHARS = 16 << 10
VAL_FRACTION = 0.02
SPLIT_SEEDS = {"null": 0, "planted": 1, "duplicates": 2}  # the seeded draw of each corpus


def stdlib_documents() -> list[str]:
    """The standard library's .py files (sorted path order) of ``MIN_DOCUMENT_BYTES`` to ``MAX_DOCUMENT_BYTES``."""
    return [text for _, text in _stdlib_sources()
            if MIN_DOCUMENT_BYTES <= len(text.encode("utf-8")) <= MAX_DOCUMENT_BYTES]


def random_split(documents: list[str], num_domains: int, seed: int, cap_bytes: int = DOMAIN_BYTES) -> list[list[str]]:
    """Each document (in a seeded shuffled order) goes to a domain drawn uniformly at random, until every
    domain holds ``cap_bytes`` of text (a document drawn for a full domain is left out)."""
    rng = random.Random(seed)
    order = list(documents)
    rng.shuffle(order)
    domains: list[list[str]] = [[] for _ in range(num_domains)]
    sizes = [0] * num_domains
    for text in order:
        k = rng.randrange(num_domains)
        if sizes[k] < cap_bytes:
            domains[k].append(text)
            sizes[k] += len(text.encode("utf-8"))
        if min(sizes) >= cap_bytes:
            break
    if min(sizes) < cap_bytes:
        raise PrepError(f"the standard library is too small for {num_domains} domains of {cap_bytes} bytes")
    return domains


def random_characters(total_bytes: int, seed: int) -> list[str]:
    """Documents of characters drawn independently and uniformly from ``string.printable``."""
    rng = random.Random(seed)
    return ["".join(rng.choices(string.printable, k=RANDOM_DOCUMENT_CHARS))
            for _ in range(-(-total_bytes // RANDOM_DOCUMENT_CHARS))]


def write_jsonl(path: Path, texts: list[str]) -> str:
    """One ``{"text": ...}`` line per document; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


def build_corpus(kind: str, out: Path, *, seq_len: int = 128, val_fraction: float = VAL_FRACTION,
                 raw_dir: Path | None = None) -> dict:
    """Prepare the ``kind`` corpus (null, planted or duplicates) with the byte tokenizer under ``out``;
    returns its manifest. The raw JSONL files go to ``raw_dir`` (default: a temporary directory)."""
    if kind not in SPLIT_SEEDS:
        raise PrepError(f"unknown known-answer corpus {kind!r}; choose from {', '.join(SPLIT_SEEDS)}")
    seed = SPLIT_SEEDS[kind]
    with tempfile.TemporaryDirectory(prefix=f"pike-{kind}-raw-") as temporary:
        raw = Path(raw_dir or temporary)
        raw.mkdir(parents=True, exist_ok=True)
        if kind == "null":
            parts = random_split(stdlib_documents(), 4, seed=seed)
            inputs = {f"part{k}": write_jsonl(raw / f"part{k}.jsonl", texts) for k, texts in enumerate(parts)}
        elif kind == "planted":
            parts = random_split(stdlib_documents(), 3, seed=seed)
            inputs = {f"third{k}": write_jsonl(raw / f"third{k}.jsonl", texts) for k, texts in enumerate(parts)}
            inputs["random_chars"] = write_jsonl(raw / "random_chars.jsonl", random_characters(DOMAIN_BYTES, seed))
        else:
            (stdlib,) = random_split(stdlib_documents(), 1, seed=seed)
            inputs = {"copy_a": write_jsonl(raw / "copy_a.jsonl", stdlib),
                      "c_headers": write_jsonl(raw / "c_headers.jsonl",
                                               [t for _, t in _header_sources() if t.strip()]),
                      "pydoc_topics": write_jsonl(raw / "pydoc_topics.jsonl",
                                                  [t for _, t in _pydoc_sources() if t.strip()])}
        manifest = prepare(inputs, str(out), seq_len=seq_len, val_fraction=val_fraction, seed=0, progress=False)
    for name, info in manifest["domains"].items():
        empty = [split for split, entry in info["splits"].items() if entry["samples"] == 0]
        if empty:
            raise PrepError(f"the {kind} corpus has no samples in split {empty[0]} at seq_len {seq_len}", domain=name)
    if kind == "duplicates":
        manifest = _duplicate_copy_a(manifest, out)
    return manifest


def _duplicate_copy_a(manifest: dict, out: Path) -> dict:
    """copy_b: copy_a's shards copied, listed right after copy_a in the manifest."""
    shutil.copytree(out / "copy_a", out / "copy_b")
    copy_b = json.loads(json.dumps(manifest["domains"]["copy_a"]))
    for split in copy_b["splits"].values():
        split["path"] = split["path"].replace("copy_a/", "copy_b/", 1)
    domains = manifest["domains"]
    manifest["domains"] = {"copy_a": domains["copy_a"], "copy_b": copy_b,
                           **{name: info for name, info in domains.items() if name != "copy_a"}}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_prep.known_answers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=list(SPLIT_SEEDS), help="which known-answer corpus")
    parser.add_argument("--out", required=True, help="output directory for the MDS shards and manifest")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                        help="each domain's share of documents in the val split (default: %(default)s)")
    parser.add_argument("--raw-dir", help="keep the raw .jsonl files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    return build_and_report(parser.prog, args.out, lambda: build_corpus(
        args.kind, Path(args.out), seq_len=args.seq_len, val_fraction=args.val_fraction,
        raw_dir=Path(args.raw_dir) if args.raw_dir else None))


if __name__ == "__main__":
    sys.exit(main())
