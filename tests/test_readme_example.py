"""README's plain-Composer example ("The PiKE algorithm") runs as written.

The block is read from README.md, so the README cannot drift from what works: only its manifest
path is replaced, by a small pike-prep corpus of three domains built here (standard-library
source, byte tokenizer). The alternative its import comment names (LossSlope) is run too.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prep_helpers import pike_prep
from streaming_prep.demo import _stdlib_sources

REPO = Path(__file__).resolve().parent.parent
SECTION = '## The PiKE algorithm'
MANIFEST_PLACEHOLDER = "'runs/demo/data'"
PIKE_CALL = 'PiKE(check_interval=20, estimation_batch_size=32)'
DOMAINS = {'asyncio': 'asyncio/', 'email': 'email/', 'json_and_xml': ('json/', 'xml/')}
CHECKS = {'pike': 2, 'loss_slope': 3}  # PiKE before batches 20, 40; loss-slope after 20, 40, 60
RESULT = re.compile(r'^(\d+) checks, weights at step (\d+): (\{.*\})$', re.M)


def readme_example() -> str:
    """The first python block after the section heading."""
    text = (REPO / 'README.md').read_text()
    start = text.index(SECTION)
    match = re.compile(r'```python\n(.*?)```', re.S).search(text, start)
    assert match is not None, f'no python block after {SECTION!r} in README.md'
    return match.group(1)


@pytest.fixture(scope='module')
def manifest(tmp_path_factory) -> Path:
    """Three domains of standard-library modules (by package), prepared with the pike-prep CLI."""
    root = tmp_path_factory.mktemp('readme')
    sources = list(_stdlib_sources())
    inputs = {}
    for name, prefixes in DOMAINS.items():
        inputs[name] = str(root / f'{name}.jsonl')
        with open(inputs[name], 'w') as out:
            for source, text in sources:
                if source.startswith(prefixes) and text.strip():
                    out.write(json.dumps({'text': text}) + '\n')
    pike_prep(inputs, root / 'data', seq_len=64)
    return root / 'data'


@pytest.mark.parametrize('algorithm', ['pike', 'loss_slope'])
def test_readme_plain_composer_example_runs(manifest, tmp_path, algorithm):
    code = readme_example()
    assert code.count(MANIFEST_PLACEHOLDER) == 1 and code.count(PIKE_CALL) == 1, code
    code = code.replace(MANIFEST_PLACEHOLDER, repr(str(manifest)))
    if algorithm == 'loss_slope':  # what the import line's comment offers instead
        code = code.replace('import PiKE', 'import LossSlope').replace(PIKE_CALL, 'LossSlope(check_interval=20)')
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=840)  # inside the 900 s per-test limit
    assert done.returncode == 0, done.stderr[-4000:]
    result = RESULT.search(done.stdout)
    assert result is not None, done.stdout[-2000:]
    checks, step, weights = int(result.group(1)), int(result.group(2)), ast.literal_eval(result.group(3))
    assert step == 60
    assert checks == CHECKS[algorithm]
    assert list(weights) == list(DOMAINS)
    assert abs(sum(weights.values()) - 1.0) < 1e-2 and min(weights.values()) > 0
