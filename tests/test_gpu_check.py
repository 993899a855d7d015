"""benchmarks/gpu_check.sh --cpu: the GPU check's every step, CPU-sized, so the script works before a GPU sees it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = {'device', 'tests', 'overhead_ratio', 'peak_mem_ratio', 'mix_samples_per_s', 'pike_samples_per_s',
        'mix_peak_bytes', 'pike_peak_bytes', 'loader_samples_per_s', 'plain_streaming_samples_per_s',
        'loader_headroom', 'wall_s'}


@pytest.mark.timeout(1600)  # above the script's own limit (the default per-test limit is 900 s)
def test_the_gpu_check_runs_on_cpu_and_ends_with_its_json_line(tmp_path):
    env = {**os.environ, 'PYTHON': sys.executable, 'TMPDIR': str(tmp_path), 'CUDA_VISIBLE_DEVICES': ''}
    done = subprocess.run(['bash', 'benchmarks/gpu_check.sh', '--cpu'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == KEYS
    assert result['device'] == 'cpu' and result['tests'] == 'passed', done.stdout[-4000:]
    for key in KEYS - {'device', 'tests'}:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, key
