"""A small real multi-domain corpus from text every Python installation has, no network.

Four domains of clearly different size and style, each capped at its own number of MB
(4, 2, 1 and 0.5 MB of UTF-8 text by default; fewer where the installation has less):

    python_stdlib  CPython standard-library .py sources            (code)
    licenses       LICENSE/METADATA/... of installed packages       (legal and prose English)
    c_headers      CPython's C include files                        (C code)
    pydoc_topics   the help() topic texts from pydoc_data           (reference prose)

Files are taken in sorted path order, so the same installation always gives the same corpus.

    python -m streaming_prep.demo --out DIR [--seq-len 256] [--max-mb-per-domain X]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from streaming_prep.errors import PrepError
from streaming_prep.pipeline import prepare

MB = 1 << 20
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS", "METADATA")


def _stdlib_sources() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not {"site-packages", "dist-packages"} & set(path.parts):
            yield str(path.relative_to(root)), path.read_text("utf-8", errors="replace")


def _license_sources() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["purelib"])
    for path in sorted(root.glob("*.dist-info/**/*")):
        if path.is_file() and path.name.upper().startswith(LICENSE_PREFIXES):
            yield str(path.relative_to(root)), path.read_text("utf-8", errors="replace")


def _header_sources() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["include"])
    for path in sorted(root.rglob("*.h")):
        yield str(path.relative_to(root)), path.read_text("utf-8", errors="replace")


def _pydoc_sources() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield name, topics[name]


# name -> (documents as (source, text), default cap in MB of UTF-8 text)
DEMO_DOMAINS = {
    "python_stdlib": (_stdlib_sources, 4.0),
    "licenses": (_license_sources, 2.0),
    "c_headers": (_header_sources, 1.0),
    "pydoc_topics": (_pydoc_sources, 0.5),
}


def build_demo_corpus(raw_dir: str, max_mb_per_domain: float | None = None) -> dict[str, str]:
    """Write raw_dir/<domain>.jsonl for each demo domain; return {domain: path} for prepare().

    A domain takes documents in order until it holds its cap of UTF-8 text (the last document
    may overshoot). max_mb_per_domain lowers the largest cap to that many MB and the others in
    proportion, so the domains keep their different sizes.
    """
    largest_cap_mb = max(cap_mb for _, cap_mb in DEMO_DOMAINS.values())
    scale = min(1.0, max_mb_per_domain / largest_cap_mb) if max_mb_per_domain else 1.0
    os.makedirs(raw_dir, exist_ok=True)
    paths = {}
    for name, (sources, cap_mb) in DEMO_DOMAINS.items():
        cap_bytes = int(cap_mb * scale * MB)
        path = os.path.join(raw_dir, f"{name}.jsonl")
        written = 0
        with open(path, "w", encoding="utf-8") as f:
            for source, text in sources():
                if written >= cap_bytes:
                    break
                if text.strip():
                    f.write(json.dumps({"text": text, "source": source}) + "\n")
                    written += len(text.encode("utf-8"))
        if written == 0:
            raise PrepError("found no text on this installation", domain=name)
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_prep.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (or remote URL) for the MDS shards")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sample")
    parser.add_argument("--max-mb-per-domain", type=float,
                        help="shrink the domains (keeping their size ratios) so the largest has at most this many MB")
    parser.add_argument("--raw-dir", help="keep the raw .jsonl files here (default: a temporary directory)")
    parser.add_argument("--workers", type=int, help="parallel processes (default: one per domain, up to the CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output location")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pike-demo-raw-") as temporary:
        return build_and_report(parser.prog, args.out, lambda: prepare(
            build_demo_corpus(args.raw_dir or temporary, args.max_mb_per_domain), args.out, seq_len=args.seq_len,
            workers=args.workers, overwrite=args.overwrite))


def build_and_report(prog: str, out: str, build: Callable[[], dict]) -> int:
    """A corpus CLI's ending: ``build()``'s manifest summarised (exit 0), or its PrepError as one line (exit 2)."""
    try:
        manifest = build()
    except PrepError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print_summary(manifest, out)
    return 0


def print_summary(manifest: dict, out: str) -> None:
    """One line per domain of a prepared corpus (MB of text, train samples), then where it went."""
    for name, domain in manifest["domains"].items():
        print(f"{name}: {domain['bytes'] / MB:.2f} MB, {domain['splits']['train']['samples']} train samples")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
