#!/usr/bin/env bash
# GPU check: what only a GPU machine can show, in one run of under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh          # on a CUDA machine (the device tool's H200)
#   bash benchmarks/gpu_check.sh --cpu    # the same steps, CPU-sized (tests/test_gpu_check.py runs this in make test)
#
# 1. tests/test_gpu.py: Composer FSDP1 FULL_SHARD + amp_bf16 training PiKE on one GPU, and the
#    probe's statistics on the GPU (FSDP2, FSDP1, DDP over nccl) against an unsharded computation
#    (their CPU forms without CUDA).
# 2. benchmarks/pike_overhead.py: PiKE vs Mix on a GPT-2-small-sized model (d768 x 12 layers, 12
#    heads, seq 1024, batch 32) at the paper's probe ratio K/1000 (E = 8 probe samples per domain,
#    T0 = ceil(1000 E / B) = 250); samples/s and peak CUDA memory. --cpu: its tiny --quick setting.
# 3. benchmarks/loader_throughput.py: the mixture loader against plain StreamingDataset (seq-1024
#    samples, local shards), set beside the samples/s the GPU trains, so the headroom says whether
#    the loader can feed it.
#
# The last line printed is JSON: device, tests (passed/failed), overhead_ratio, peak_mem_ratio,
# mix_samples_per_s, pike_samples_per_s, loader_samples_per_s, plain_streaming_samples_per_s,
# loader_headroom (loader / Mix training samples/s), wall_s.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d -t pike-gpu-check-XXXXXX)
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)

if [ "${1:-}" = "--cpu" ]; then
    device=cpu
    overhead_args=(--device cpu --quick --k64-reps 0 --max-mb 0.2)
    loader_args=(--samples 2000 --batches 20 --warmup 2 --reps 1 --workers 1 --skip-s3)
else
    device=gpu
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device (use --cpu)")' || exit 2
    overhead_args=(--device gpu --d-model 768 --n-layers 12 --n-heads 12 --seq-len 1024 --batch 32
                   --estimation-batch 8 --num-chunks 4 --mem-d-model 768 --mem-n-layers 12 --reps 2 --mem-reps 1
                   --k64-reps 0 --workers 2 --threads 4)
    loader_args=(--samples 8000 --batches 60 --reps 2 --workers 4 --skip-s3)
fi

echo "== 1/3 tests/test_gpu.py ($device)"
if "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py; then tests=passed; else tests=failed; fi

echo "== 2/3 PiKE vs Mix (benchmarks/pike_overhead.py ${overhead_args[*]})"
"$PYTHON" benchmarks/pike_overhead.py "${overhead_args[@]}" | tee "$OUT/overhead.log"
echo "== 3/3 mixture loader vs plain StreamingDataset (benchmarks/loader_throughput.py ${loader_args[*]})"
"$PYTHON" benchmarks/loader_throughput.py "${loader_args[@]}" | tee "$OUT/loader.log"

"$PYTHON" - "$OUT" "$device" "$tests" "$start" <<'EOF'
import json, sys, time

out, device, tests, start = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def last_json(path):
    lines = [line for line in open(path).read().splitlines() if line.startswith('{')]
    return json.loads(lines[-1]) if lines else {}


overhead, loader = last_json(f'{out}/overhead.log'), last_json(f'{out}/loader.log')
batch = overhead.get('config', {}).get('batch')
mix_ms = overhead.get('mix_step_ms')
mix_rate = batch / mix_ms * 1e3 if batch and mix_ms else None
pike_rate = mix_rate / overhead['overhead_ratio'] if mix_rate and overhead.get('overhead_ratio') else None
loader_rate = loader.get('local_mixture_samples_per_s')
print(json.dumps({
    'device': device, 'tests': tests,
    'overhead_ratio': overhead.get('overhead_ratio'), 'peak_mem_ratio': overhead.get('peak_mem_ratio'),
    'mix_samples_per_s': mix_rate, 'pike_samples_per_s': pike_rate,
    'mix_peak_bytes': overhead.get('mix_peak_bytes'), 'pike_peak_bytes': overhead.get('pike_peak_bytes'),
    'loader_samples_per_s': loader_rate, 'plain_streaming_samples_per_s': loader.get('local_plain_samples_per_s'),
    'loader_headroom': loader_rate / mix_rate if loader_rate and mix_rate else None,
    'wall_s': round(time.time() - start),
}))
EOF
