"""What only a GPU can show, with a CPU stand-in for each case so this file runs everywhere.

On a CUDA machine (benchmarks/gpu_check.sh): Composer's FSDP1 with FULL_SHARD and amp_bf16 trains
PiKE through ``composer_pike.train`` on one GPU, and the probe's statistics on the GPU (FSDP2, FSDP1,
DDP over nccl) match an unsharded float computation on the CPU. Without CUDA the same tests run
their CPU forms: FSDP2 in fp32 (Composer's FSDP1 needs CUDA) and gloo.
"""
from __future__ import annotations

import math
import subprocess
import sys

import torch
from launch_helpers import free_port
from test_stats import load_worker_module, run_dist_stats_worker
from test_train import (CPU_FSDP2, DOMAINS, MULTILINGUAL_YAML, REPO, TINY, launcher_env, read_series,
                        write_manifest)

ON_GPU = torch.cuda.is_available()
DEVICE_OVERRIDES = ([] if ON_GPU else CPU_FSDP2)  # the yaml itself: gpu, amp_bf16, FSDP1 FULL_SHARD


def test_pike_trains_under_composer_fsdp_full_shard(tmp_path):
    """The paper-like GPU yaml (FSDP1 FULL_SHARD, amp_bf16), shrunk, on one GPU; FSDP2 fp32 on CPU."""
    data = write_manifest(tmp_path / 'data')
    out = tmp_path / 'out'
    env = launcher_env(tmp_path / 'tmp')
    if ON_GPU:
        del env['CUDA_VISIBLE_DEVICES']
    overrides = [*TINY, 'data.num_workers=0', f'data.manifest={data}', f'run_dir={out}', 'model.n_layers=2',
                 *DEVICE_OVERRIDES, 'trainer.save_folder=null', 'trainer.autoresume=false']
    command = [sys.executable, '-m', 'composer.cli.launcher', '-n', '1', '--master_port', str(free_port()),
               '-m', 'composer_pike.train', MULTILINGUAL_YAML, *overrides]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    series = read_series(out / 'metrics.jsonl')
    weights = [series[f'pike/weight/{domain}'][-1][1] for domain in DOMAINS]
    assert math.isclose(sum(weights), 1, abs_tol=1e-6)
    assert all(math.isfinite(value) for _, value in series['loss/train/total'])
    log = (out / 'log-rank0.txt').read_text()
    assert ('precision: amp_bf16' in log) == ON_GPU
    assert all(series[f'metrics/val_{domain}/LanguageCrossEntropy'] for domain in DOMAINS)


def test_probe_statistics_on_the_device_match_an_unsharded_computation(tmp_path):
    """FSDP2, FSDP1 and DDP on one GPU (nccl) against the unsharded single-process computation on
    CPU; without CUDA, two gloo ranks (as tests/test_stats.py)."""
    device, nproc = ('cuda', 1) if ON_GPU else ('cpu', 2)
    result = run_dist_stats_worker(tmp_path, nproc=nproc, device=device)[0]
    reference = load_worker_module().collect_probe(load_worker_module().build_model()).finalize()
    for mode in ('fsdp2', 'fsdp1', 'ddp'):
        for name in ('grad_sq_norms', 'per_sample_variances', 'chunk_grad_sq_norms', 'cosines'):
            torch.testing.assert_close(torch.tensor(result[mode][name], dtype=torch.float64),
                                       getattr(reference, name), rtol=1e-4, atol=1e-5, msg=f'{mode} {name}')

