"""PiKE's probe: chunk forward/backward passes of a few domains' own probe samples through the model.

The passes use the training model, its precision context and its loss, and leave no trace on
training: the global RNG is forked (dropout draws), and the gradients they leave are wiped by the
trainer's own ``zero_grad`` before the step (the probe runs at BEFORE_TRAIN_BATCH).
"""
from __future__ import annotations

import numpy as np
import torch
from composer.core import State
from composer.core.precision import get_precision_context
from composer.utils import dist
from torch.nn.parallel import DistributedDataParallel

from composer_pike.data import MixtureDataset
from composer_pike.stats import (GradientStatistics, GradientStatsAccumulator, gradient_layout, gradient_replicas,
                                 gradient_sum_factor)


def probe_gradients(
    state: State,
    mixture: MixtureDataset,
    domains: np.ndarray,
    *,
    estimation_batch_size: int,
    num_chunks: int,
    conflict_sketch_size: int,
    microbatch_size: int | None = None,
) -> tuple[GradientStatistics, np.ndarray]:
    """G_k, sigma_k^2 (and the conflict sketch) of ``domains`` from ``num_chunks`` chunks each.

    Every domain's ``estimation_batch_size`` probe samples (all ranks; from its own probe order)
    run in chunks of ``estimation_batch_size / num_chunks``, each rank its slice, in per-rank
    micro-batches of ``microbatch_size`` (default: the trainer's device microbatch, else the whole
    slice). Returns the statistics and each domain's mean probe loss (nats per token).
    """
    device = state.device._device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        return _chunk_passes(state, mixture, domains, estimation_batch_size, num_chunks, conflict_sketch_size,
                             microbatch_size)


def _chunk_passes(state: State, mixture: MixtureDataset, domains: np.ndarray, estimation_batch_size: int,
                  num_chunks: int, conflict_sketch_size: int,
                  microbatch_size: int | None) -> tuple[GradientStatistics, np.ndarray]:
    model = state.model
    loss_owner = model.module if isinstance(model, DistributedDataParallel) else model
    rank, world_size = dist.get_global_rank(), dist.get_world_size()
    chunk_size = estimation_batch_size // num_chunks
    rank_chunk = chunk_size // world_size
    micro = microbatch_size or _device_microbatch(state) or rank_chunk
    loss_scale = 1.0 / gradient_sum_factor(model)
    params = [p for p in model.parameters() if p.requires_grad]
    accumulator = GradientStatsAccumulator(
        params, len(domains), chunk_size=chunk_size, conflict_sketch_size=conflict_sketch_size,
        seed=int(state.timestamp.batch), layout=gradient_layout(model), replicas=gradient_replicas(model))
    # on the device: adding a loss there needs no host synchronisation per micro-batch
    loss_sums = torch.zeros(len(domains), dtype=torch.float64, device=state.device._device)
    for slot, domain in enumerate(domains):
        batch = mixture.probe_batch(int(domain), estimation_batch_size, num_chunks, rank, world_size)
        batch = state.device.batch_to_device(batch)
        accumulator.begin_domain(slot)
        for start in range(0, estimation_batch_size // world_size, rank_chunk):
            model.zero_grad(set_to_none=True)
            for micro_start in range(start, start + rank_chunk, micro):
                rows = {key: value[micro_start:min(micro_start + micro, start + rank_chunk)]
                        for key, value in batch.items()}
                with get_precision_context(state.precision, state.precision_config):
                    outputs = model(rows)
                    loss = loss_owner.loss(outputs, rows)
                share = len(rows['input_ids']) / rank_chunk
                (loss * share * loss_scale).backward()
                loss_sums[slot] += loss.detach().double() * share
            accumulator.add_chunk()
        accumulator.end_domain()
    model.zero_grad(set_to_none=True)
    statistics = accumulator.finalize()
    if world_size > 1:
        dist.all_reduce(loss_sums)
    return statistics, (loss_sums / (num_chunks * world_size)).cpu().numpy()


def _device_microbatch(state: State) -> int | None:
    size = getattr(state, 'device_train_microbatch_size', None)
    return size if isinstance(size, int) and size > 0 else None
