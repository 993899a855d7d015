"""Running llm-foundry for real in tests: data in its two forms, the train command, its metrics.

These tests run in the venv that has llm-foundry (``make test`` uses .venv-foundry for
tests/test_foundry*.py). Under ``PIKE_REQUIRE_FOUNDRY=1`` (set by ``make test``) a missing
llm-foundry fails them instead of skipping them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
SEQ_LEN = 128  # yamls/llmfoundry/*.yaml: max_seq_len
# Set in this process once anything has asked composer.utils.dist; the launcher must choose its own.
LAUNCHER_VARIABLES = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR',
                      'MASTER_PORT')


def require_llmfoundry() -> Any:
    """The llmfoundry module; a skip where it is not installed, a failure under ``make test``."""
    if os.environ.get('PIKE_REQUIRE_FOUNDRY') == '1':
        import llmfoundry
        return llmfoundry
    return pytest.importorskip('llmfoundry', reason='llm-foundry is not installed (make test uses .venv-foundry)')


def save_byte_tokenizer(directory: Path) -> str:
    """pike-prep's `byte` ids are ByT5's: a saved ByT5Tokenizer is the run's tokenizer (no files to fetch)."""
    from transformers import ByT5Tokenizer
    ByT5Tokenizer().save_pretrained(str(directory))
    return str(directory)


def convert_with_llmfoundry(documents: Path, out_root: Path, tokenizer: str) -> None:
    """Shards as llm-foundry's `convert_dataset_json --concat_tokens SEQ_LEN` writes them (tokens: ndarray:int32)."""
    from llmfoundry.command_utils import convert_dataset_json_from_args
    convert_dataset_json_from_args(path=str(documents), out_root=str(out_root), compression='zstd',
                                   concat_tokens=SEQ_LEN, split='train', tokenizer=tokenizer, bos_text=None,
                                   eos_text=None, no_wrap=False, num_workers=None)


def split_documents(documents: Path, directory: Path, val_documents: int) -> tuple[Path, Path]:
    """Write the first documents of a .jsonl to train.jsonl and the last ``val_documents`` to val.jsonl."""
    lines = documents.read_text().splitlines()
    directory.mkdir(parents=True, exist_ok=True)
    train, val = directory / 'train.jsonl', directory / 'val.jsonl'
    train.write_text('\n'.join(lines[:-val_documents]) + '\n')
    val.write_text('\n'.join(lines[-val_documents:]) + '\n')
    return train, val


@dataclass
class FoundryRun:
    """A finished ``llmfoundry train``: exit code, console output and the metrics it logged."""
    returncode: int
    output: str
    metrics: list[dict[str, float]] = field(default_factory=list)

    def series(self, name: str) -> list[tuple[int, float]]:
        """(batch, value) of every logged value of ``name``."""
        return [(int(row['step']), row[name]) for row in self.metrics if name in row]

    def last(self, name: str) -> float:
        return self.series(name)[-1][1]

    def names(self, prefix: str) -> set[str]:
        return {name for row in self.metrics for name in row if name.startswith(prefix)}

    @property
    def trained_batches(self) -> int:
        """Batches trained: one ``loss/train/total`` each."""
        return len(self.series('loss/train/total'))

    def check(self) -> None:
        assert self.returncode == 0, f'llmfoundry train failed ({self.returncode}):\n{self.output[-6000:]}'


def foundry_train(yaml: Path | str, workdir: Path, *overrides: str, ranks: int = 1, timeout: float = 900) -> FoundryRun:
    """``llmfoundry train YAML OVERRIDES`` in ``workdir`` (on ``ranks`` processes through the composer
    launcher), metrics to ``workdir/metrics.jsonl`` through composer-pike's ``pike_jsonl`` logger."""
    from launch_helpers import free_port
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = workdir / 'metrics.jsonl'
    if metrics.exists():
        metrics.unlink()
    train = ['-m', 'llmfoundry.cli.cli', 'train', str(yaml), f'loggers.pike_jsonl.path={metrics}', *overrides]
    launcher = ['-m', 'composer.cli.launcher', '-n', str(ranks), '--master_port', str(free_port())] if ranks > 1 else []
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(OFFLINE, PYTHONUNBUFFERED='1')
    result = subprocess.run([sys.executable, *launcher, *train], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=timeout)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return FoundryRun(result.returncode, result.stdout + result.stderr, rows)


def readme_block(title: str, language: str = 'yaml') -> str:
    """The first ```<language> block after the README heading ``title``."""
    text = (REPO / 'README.md').read_text()
    start = text.index(title)
    match = re.search(rf'```{language}\n(.*?)```', text[start:], flags=re.S)
    assert match, f'README: no {language} block after {title!r}'
    return match.group(1)
