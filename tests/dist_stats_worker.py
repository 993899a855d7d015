"""Multi-process check of composer_pike.stats under FSDP2, FSDP1 and DDP (gloo, CPU).

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/dist_stats_worker.py OUT_DIR [DEVICE]``;
every rank writes ``OUT_DIR/rank{r}.json``. DEVICE is ``cpu`` (gloo, the default) or ``cuda`` (nccl,
one GPU per rank: benchmarks/gpu_check.sh). tests/test_stats.py imports ``build_model`` and
``collect_probe`` from here to compute the single-process reference on the same data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from composer_pike.stats import GradientStatsAccumulator, gradient_layout, gradient_sum_factor

NUM_DOMAINS = 3
NUM_CHUNKS = 4
CHUNK_SIZE = 4  # global samples per chunk; each of the 2 ranks sees half
IN_FEATURES, HIDDEN, OUT_FEATURES = 5, 7, 3  # odd sizes give uneven shards
SKETCH_SIZE = 4096  # more than the parameter count: stride 1, so cosines are exact


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_FEATURES)
    )


def make_chunk(domain: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global chunk (CHUNK_SIZE samples) number ``chunk`` of ``domain``."""
    generator = torch.Generator().manual_seed(1000 * domain + chunk)
    inputs = torch.randn(CHUNK_SIZE, IN_FEATURES, generator=generator)
    target_means = torch.tensor([[3.0, 0.0, 0.0], [0.0, -3.0, 1.0], [2.0, 2.0, 0.0]])
    noise = 0.5 * torch.randn(CHUNK_SIZE, OUT_FEATURES, generator=generator)
    return inputs, target_means[domain] + noise


def collect_probe(
    model: nn.Module, *, rank: int = 0, world_size: int = 1, loss_scale: float = 1.0,
    device: torch.device = torch.device("cpu"),
) -> GradientStatsAccumulator:
    """The probe as the Composer glue runs it, up to (excluding) finalize().

    Each rank feeds its slice of every global chunk.
    """
    accumulator = GradientStatsAccumulator(
        [p for p in model.parameters() if p.requires_grad],
        NUM_DOMAINS,
        chunk_size=CHUNK_SIZE,
        conflict_sketch_size=SKETCH_SIZE,
        seed=0,
        layout=gradient_layout(model),
    )
    local_samples = slice(rank * CHUNK_SIZE // world_size, (rank + 1) * CHUNK_SIZE // world_size)
    for domain in range(NUM_DOMAINS):
        accumulator.begin_domain(domain)
        for chunk in range(NUM_CHUNKS):
            inputs, targets = (t.to(device) for t in make_chunk(domain, chunk))
            model.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(inputs[local_samples]), targets[local_samples])
            (loss * loss_scale).backward()
            accumulator.add_chunk()
        accumulator.end_domain()
    model.zero_grad(set_to_none=True)
    return accumulator


def wrap(model: nn.Module, mode: str, device: torch.device = torch.device("cpu")) -> nn.Module:
    model = model.to(device)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, use_orig_params=True, device_id=device)
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    raise ValueError(mode)


def main(out_dir: Path, device_type: str = "cpu") -> None:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shard_group = dist.new_group(list(range(world_size)))  # exercises the process_group argument
    results = {}
    for mode in ("fsdp2", "fsdp1", "ddp"):
        model = wrap(build_model(), mode, device)
        # FSDP2's ReduceOp.AVG reduce-scatter sums on gloo (pytorch/pytorch#162338); the PiKE probe
        # divides its loss by gradient_sum_factor. The uncorrected probe shows the distortion itself.
        sum_factor = gradient_sum_factor(model)
        raw = collect_probe(model, rank=rank, world_size=world_size, device=device).finalize()
        accumulator = collect_probe(
            model, rank=rank, world_size=world_size, loss_scale=1 / sum_factor, device=device
        )
        all_reduce_calls = 0
        original_all_reduce = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            nonlocal all_reduce_calls
            all_reduce_calls += 1
            return original_all_reduce(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            stats = accumulator.finalize(process_group=shard_group if mode == "fsdp1" else None)
        finally:
            dist.all_reduce = original_all_reduce
        results[mode] = {
            "layout": gradient_layout(model),
            "sum_factor": sum_factor,
            "raw_grad_sq_norms": raw.grad_sq_norms.tolist(),
            "raw_per_sample_variances": raw.per_sample_variances.tolist(),
            "all_reduce_calls": all_reduce_calls,
            "grad_sq_norms": stats.grad_sq_norms.tolist(),
            "per_sample_variances": stats.per_sample_variances.tolist(),
            "chunk_grad_sq_norms": stats.chunk_grad_sq_norms.tolist(),
            "cosines": stats.cosines.tolist(),
        }
        dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
