"""The pike-prep CLI as tests use it: byte tokenizer, JSONL inputs, one manifest back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def pike_prep(inputs: dict[str, str], out: Path, *, seq_len: int, val_fraction: float | None = None) -> dict:
    """Run ``python -m streaming_prep`` on ``{domain: jsonl path}``; returns the manifest.

    Every domain's every split must hold samples (a test corpus too small for its split is a
    broken test, not a result).
    """
    command = [sys.executable, '-m', 'streaming_prep', '--out', str(out), '--tokenizer', 'byte',
               '--seq-len', str(seq_len), '--seed', '0']
    if val_fraction is not None:
        command += ['--val-fraction', str(val_fraction)]
    for name, path in inputs.items():
        command += ['--domain', f'{name}={path}']
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    print(done.stdout, end='')
    manifest = json.loads((out / 'manifest.json').read_text())
    for name, info in manifest['domains'].items():
        assert all(split['samples'] > 0 for split in info['splits'].values()), (name, info['splits'])
    return manifest
