"""Multi-process check of composer_pike.stats under FSDP2, FSDP1 and DDP (gloo, CPU).

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/dist_stats_worker.py OUT_DIR [DEVICE]``;
every rank writes ``OUT_DIR/rank{r}.json``. DEVICE is ``cpu`` (gloo, the default) or ``cuda`` (nccl, one
GPU per rank: benchmarks/gpu_check.sh). On 4 processes it checks hybrid sharding instead: FSDP1
HYBRID_SHARD in two shard groups of 2 ranks (two replicas), and FSDP2 on a 2 x 2 mesh (HSDP; its replica
count only: FSDP2's HSDP all-reduce uses ReduceOp.AVG, which gloo refuses). tests/test_stats.py imports
``build_model`` and ``collect_probe`` from here to compute the single-process reference on the same data.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from composer_pike.stats import GradientStatsAccumulator, gradient_layout, gradient_replicas, gradient_sum_factor

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
    device: torch.device = torch.device("cpu"), replicas: int = 1,
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
        replicas=replicas,
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


def hybrid_groups(shard_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(this rank's shard group, its replicate group): consecutive ranks shard, strided ranks replicate."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shard_groups = [dist.new_group(list(range(start, start + shard_size)))
                    for start in range(0, world_size, shard_size)]
    replicate_groups = [dist.new_group(list(range(offset, world_size, shard_size))) for offset in range(shard_size)]
    return shard_groups[rank // shard_size], replicate_groups[rank % shard_size]


def wrap(model: nn.Module, mode: str, device: torch.device = torch.device("cpu")) -> nn.Module:
    model = model.to(device)
    if mode == "fsdp1_hybrid":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        return FullyShardedDataParallel(model, use_orig_params=True, device_id=device,
                                        sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                                        process_group=hybrid_groups(2))
    if mode == "fsdp2_hsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size() // 2, 2), mesh_dim_names=("replicate", "shard"))
        return fully_shard(model, mesh=mesh)
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


def hybrid_results(rank: int, world_size: int, device: torch.device) -> dict:
    """FSDP1 HYBRID_SHARD statistics (uncorrected and divided by the replica count) and FSDP2 HSDP's count."""
    hsdp = wrap(build_model(), "fsdp2_hsdp", device)
    model = wrap(build_model(), "fsdp1_hybrid", device)
    replicas = gradient_replicas(model)
    raw = collect_probe(model, rank=rank, world_size=world_size, device=device).finalize()
    stats = collect_probe(model, rank=rank, world_size=world_size, device=device, replicas=replicas).finalize()
    return {
        "fsdp2_hsdp": {"layout": gradient_layout(hsdp), "replicas": gradient_replicas(hsdp)},
        "fsdp1_hybrid": {
            "layout": gradient_layout(model), "replicas": replicas,
            "raw_grad_sq_norms": raw.grad_sq_norms.tolist(), "grad_sq_norms": stats.grad_sq_norms.tolist(),
            "per_sample_variances": stats.per_sample_variances.tolist(), "cosines": stats.cosines.tolist(),
            "inner_products": stats.inner_products.tolist(),
        },
    }


def sharding_results(rank: int, world_size: int, device: torch.device) -> dict:
    """FSDP2, FSDP1 and DDP statistics, uncorrected and corrected by gradient_sum_factor."""
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
    return results


def main(out_dir: Path, device_type: str = "cpu") -> None:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = (hybrid_results if world_size == 4 else sharding_results)(rank, world_size, device)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # no rank tears the process groups down while another is still in a collective
    if world_size == 4:
        # After the hybrid groups, torch 2.7's gloo destroy_process_group() hung on one rank in about 1 run
        # in 8 here (stack: inside the C++ shutdown, every rank past this barrier). Every rank has written
        # its results, so the hybrid run leaves without tearing the groups down.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
