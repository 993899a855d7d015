"""Per-domain gradient statistics for PiKE (PIKE_MATH.md section 7): chunk gradients to sums of squares.

For every domain k the probe runs M chunk micro-batches of m samples each and reads the
chunk-mean gradients ghat_1..ghat_M. From S = sum_i ghat_i and Q = sum_i ||ghat_i||^2:

    G_k       = (||S||^2 - Q) / (M (M - 1))        unbiased for ||grad L_k||^2
    sigma_k^2 = m (Q - ||S||^2 / M) / (M - 1)      unbiased for the per-sample variance trace

(McCandlish et al. 2018, App. A.1, with B_small = m and B_big = M m.)

Only one gradient-sized buffer (S, shaped like the *local* gradients) is kept and reused for
every domain. Squared norms and inner products are additive over disjoint shards, so under
FSDP each rank keeps its local partial sums and ``finalize`` adds them with one all-reduce.

Inner products between domains (optional): the conflict monitor's cosines and PiKE's alignment
terms need <grad L_j, grad L_k> without K gradient buffers. At the end of each domain the
accumulator folds S into two signed count sketches of p buckets each (p the largest prime <= m/2, m =
``conflict_sketch_size``): coordinate i of the concatenated local gradient vector goes to bucket
i mod p of sketch r with a random sign s_ri (the signs drawn once per probe, the same for every
domain), sk_rb = sum_{i = b mod p} s_ri S_i. Distinct coordinates' signs are independent, so each
<sk_rj, sk_rk> is unbiased for <S_j, S_k>, with a variance of about ||S_j||^2 ||S_k||^2 / p
however the gradient's energy is spread over its coordinates (sampling coordinates instead misses a
gradient whose energy sits in a few). The estimate is the mean of the two; its variance is estimated
without bias from their per-bucket differences, sum_b (sk_1jb sk_1kb - sk_2jb sk_2kb)^2 / 4 (the
replicates share the buckets' coordinates, so a bucket whose inner product is one large coordinate
contributes nothing, as it adds no error). When the local gradient has at most m coordinates the
sketch is S itself (no variance). For j != k the domains' samples are independent, so
E <S_j, S_k> = M^2 <grad L_j, grad L_k>: the numerator is unbiased; dividing by sqrt(G_j G_k) makes
the cosine consistent, not unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.tensor import DTensor

from composer_pike.stats.estimators import estimate_from_sums, pairwise_cosines

LAYOUTS = ("replicated", "sharded")
HYBRID_STRATEGIES = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)


def _largest_prime_at_most(number: int) -> int:
    """The sketch's bucket count: a prime, so that i mod buckets does not line up with the power-of-two
    strides of weight matrices (one outlier feature's column would otherwise fold into few buckets)."""
    for candidate in range(max(number, 2), 1, -1):
        if all(candidate % divisor for divisor in range(2, int(candidate**0.5) + 1)):
            return candidate
    return 2


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_gradient(param: torch.Tensor) -> torch.Tensor | None:
    """``param.grad`` as a plain tensor holding this rank's part of the gradient.

    FSDP2 gradients are DTensors (Shard(0)) and become their local shard; FSDP1
    (use_orig_params) and DDP gradients already are plain tensors. Returns None when the
    parameter has no gradient or this rank's shard is empty.
    """
    if param.grad is None:
        return None
    grad = _local_tensor(param.grad)
    return grad if grad.numel() > 0 else None


def gradient_layout(model: torch.nn.Module) -> str:
    """'sharded' if gradients are split across ranks (FSDP1 or FSDP2), else 'replicated'.

    FSDP1 counts as sharded unless it uses ShardingStrategy.NO_SHARD; FSDP2 is recognised by
    its DTensor parameters, assumed to be disjoint shards (tensor-parallel Replicate
    placements are not supported). Plain modules and DDP hold the full gradient on every rank.
    """
    for module in model.modules():
        if (
            isinstance(module, FullyShardedDataParallel)
            and module.sharding_strategy != ShardingStrategy.NO_SHARD
        ):
            return "sharded"
    if any(isinstance(param, DTensor) for param in model.parameters()):
        return "sharded"
    return "replicated"


def gradient_replicas(model: torch.nn.Module) -> int:
    """How many ranks hold each coordinate of a sharded gradient: the replica groups of hybrid sharding.

    FSDP1 HYBRID_SHARD (and _HYBRID_SHARD_ZERO2) shards within ``process_group`` and replicates across
    the world / its size groups; FSDP2 on a 2-D mesh (HSDP) replicates over its Replicate mesh
    dimensions. Every replica holds the same averaged shard, so a sum of per-rank partial sums over the
    world counts each coordinate this many times. 1 without a process group or for plain sharding.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel) and module.sharding_strategy in HYBRID_STRATEGIES:
            return dist.get_world_size() // module.process_group.size()
    param = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    if param is None:
        return 1
    return math.prod(param.device_mesh.size(mesh_dim) for mesh_dim, placement in enumerate(param.placements)
                     if placement.is_replicate())


def gradient_sum_factor(model: torch.nn.Module) -> int:
    """How many times the mean gradient FSDP2 leaves in ``p.grad``: the shard group size on gloo, else 1.

    FSDP2 reduce-scatters fp32 and bf16 gradients with ReduceOp.AVG, which gloo's reduce-scatter
    silently treats as SUM (pytorch/pytorch#162338, torch 2.7), so on CPU the sharded gradients
    are (shard group size) times the mean. Plain modules, DDP and FSDP1 (both divide by
    themselves), NCCL and a single process are unaffected. FSDP2 with an fp16 reduce dtype (not
    reachable through Composer on CPU) divides by itself too and is not recognised here.
    tests/test_stats.py compares this factor with the measured FSDP2 gradients, so a torch
    release that fixes the bug fails there.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    param = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    if param is None:
        return 1
    mesh = param.device_mesh
    factor = 1
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard() and dist.get_backend(mesh.get_group(mesh_dim)) == "gloo":
            factor *= mesh.size(mesh_dim)
    return factor


@dataclass
class GradientStatistics:
    """Result of one probe; identical on every rank, float64 tensors on the CPU."""

    grad_sq_norms: torch.Tensor  # (K,) unbiased ||grad L_k||^2, raw (may be negative)
    per_sample_variances: torch.Tensor  # (K,) per-sample gradient variance trace sigma_k^2
    chunk_grad_sq_norms: torch.Tensor  # (K, M) squared norms of the chunk-mean gradients
    cosines: torch.Tensor | None  # (K, K) this probe's cosines, None without the sketch (PiKE logs pooled ones)
    num_chunks: int
    chunk_size: int
    inner_products: torch.Tensor | None = None  # (K, K) unbiased <grad L_j, grad L_k> off the diagonal
    inner_product_sketch_var: torch.Tensor | None = None  # (K, K) variance the sketch adds to them


class GradientStatsAccumulator:
    """Accumulates chunk-mean gradients domain by domain; see the module docstring.

    Usage per probe: for each domain ``begin_domain(k)``, then after every chunk's backward
    ``add_chunk()``, then ``end_domain()``; finally ``finalize()``. ``finalize`` resets the
    accumulator, so it may be reused for the next probe (with fresh sketch signs).

    Args:
        params: the trainable parameters (plain, FSDP1 flat-shard views, or FSDP2 DTensors).
        num_domains: K.
        chunk_size: m, global samples per chunk (used for the per-sample variance).
        conflict_sketch_size: buckets m of each domain's gradient sketch, for the conflict monitor and
            the alignment terms (0 disables them).
        seed: seeds the sketch signs; must be the same on every rank.
        layout: 'sharded' if each rank holds a disjoint part of the gradient (FSDP), else
            'replicated'; see ``gradient_layout``.
        replicas: ranks of the all-reduce group that hold each coordinate of a sharded gradient (hybrid
            sharding; see ``gradient_replicas``): finalize divides the all-reduced sums by it.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        num_domains: int,
        *,
        chunk_size: int,
        conflict_sketch_size: int = 0,
        seed: int = 0,
        layout: str = "replicated",
        replicas: int = 1,
    ) -> None:
        if num_domains < 1 or chunk_size < 1 or conflict_sketch_size < 0:
            raise ValueError(
                "need num_domains >= 1, chunk_size >= 1 and conflict_sketch_size >= 0, got "
                f"{num_domains}, {chunk_size}, {conflict_sketch_size}"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.num_domains = num_domains
        self.replicas = replicas
        self.chunk_size = chunk_size
        self.conflict_sketch_size = conflict_sketch_size
        self.layout = layout

        params = list(params)
        local_params = [_local_tensor(param) for param in params]
        self._device = local_params[0].device if local_params else torch.device("cpu")
        devices = {local.device for local in local_params}
        if len(devices) > 1:
            raise ValueError(
                f"the model's parameters are on several devices ({sorted(map(str, devices))}); the "
                "gradient statistics need every parameter (or local shard) on one device per rank"
            )
        has_float64 = any(local.dtype == torch.float64 for local in local_params)
        self._accum_dtype = torch.float64 if has_float64 else torch.float32
        # Parameters whose local shard is empty contribute nothing on this rank.
        self._params = [p for p, local in zip(params, local_params) if local.numel() > 0]
        # One flat buffer holds S; each parameter's part is a view of it, so the sketch folds it in
        # large pieces rather than parameter by parameter.
        local_numel = sum(local.numel() for local in local_params)
        self._flat_sum = torch.zeros(local_numel, dtype=self._accum_dtype, device=self._device)
        self._sum_buffers = [
            view.view(local.shape)
            for view, local in zip(self._flat_sum.split([local.numel() for local in local_params]), local_params)
            if local.numel() > 0
        ]
        self._sketch_exact = local_numel <= conflict_sketch_size  # the sketch is S itself
        # (replicates, buckets) of each domain's sketch
        self._sketch_shape = ((1, local_numel) if self._sketch_exact
                              else (2, _largest_prime_at_most(conflict_sketch_size // 2)))
        self._generator = torch.Generator().manual_seed(seed)
        self._start_cycle()

    def _start_cycle(self) -> None:
        """Forget all domains and draw the sketch signs' seed for the next probe."""
        self._current_domain: int | None = None
        self._current_chunk_sq_norms: list[torch.Tensor] = []
        self._chunk_sq_norms: dict[int, torch.Tensor] = {}
        self._sum_sq_norms: dict[int, torch.Tensor] = {}
        if self.conflict_sketch_size == 0:
            self._sketch = None
            return
        self._sketch_seed = int(torch.randint(2**62, (1,), generator=self._generator))
        self._sketch = torch.zeros(
            self.num_domains, *self._sketch_shape, dtype=self._accum_dtype, device=self._device
        )

    def _fold_into_sketch(self, sketch: torch.Tensor) -> None:
        """sketch[r, b] = sum over coordinates i = b (mod buckets) of s_ri S_i, signs from this probe's seed."""
        if self._sketch_exact:
            sketch[0].copy_(self._flat_sum)
            return
        sketch.zero_()
        buckets = sketch.shape[1]
        generator = torch.Generator(device=self._device).manual_seed(self._sketch_seed)
        # Pieces of about 4M coordinates (whole rows of buckets) bound the temporaries.
        pieces = self._flat_sum.split(buckets * max(1, 2**22 // buckets))
        for replicate in sketch:
            for piece in pieces:
                signs = torch.randint(0, 2, piece.shape, generator=generator, device=piece.device,
                                      dtype=torch.int8)  # int8 draws are about 3x faster than int64
                signed = piece * (2 * signs - 1).to(piece.dtype)
                padded = torch.nn.functional.pad(signed, (0, -piece.numel() % buckets))
                replicate += padded.view(-1, buckets).sum(0)

    def _sum_of_squares(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """sum_t ||t||^2 as a float64 scalar on the accumulator's device (no host sync)."""
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=self._device)
        norms = torch._foreach_norm(tensors, 2, dtype=self._accum_dtype)
        return torch.stack(norms).double().square().sum()

    def begin_domain(self, domain: int) -> None:
        """Start collecting the chunks of ``domain``; zeroes the running sum S."""
        if self._current_domain is not None:
            raise RuntimeError(
                f"begin_domain({domain}) called while domain {self._current_domain} is open; "
                "call end_domain() first"
            )
        if not 0 <= domain < self.num_domains:
            raise RuntimeError(
                f"domain {domain} is out of range: the accumulator was built for "
                f"num_domains={self.num_domains}"
            )
        if domain in self._sum_sq_norms:
            raise RuntimeError(f"domain {domain} was already collected in this probe")
        self._flat_sum.zero_()
        self._current_domain = domain
        self._current_chunk_sq_norms = []

    def add_chunk(self) -> None:
        """Read the current gradients (one chunk-mean gradient) and add them to S.

        Parameters without a gradient count as zero.
        """
        if self._current_domain is None:
            raise RuntimeError("add_chunk() called before begin_domain()")
        grads, buffers = [], []
        for index, (param, buffer) in enumerate(zip(self._params, self._sum_buffers)):
            grad = local_gradient(param)
            if grad is None:
                continue
            if grad.shape != buffer.shape:
                raise RuntimeError(
                    f"local gradient of parameter {index} has shape {tuple(grad.shape)}, but the "
                    f"accumulator was built for {tuple(buffer.shape)}; build it while the "
                    "parameters are in their sharded (training-time) layout"
                )
            grads.append(grad)
            buffers.append(buffer)
        self._current_chunk_sq_norms.append(self._sum_of_squares(grads))
        if grads:
            torch._foreach_add_(buffers, grads)

    def end_domain(self) -> None:
        """Close the open domain: store ||S||^2 (local part) and its sketch."""
        domain = self._current_domain
        if domain is None:
            raise RuntimeError("end_domain() called without an open domain")
        num_chunks = len(self._current_chunk_sq_norms)
        if num_chunks == 0:
            raise RuntimeError(f"end_domain() called for domain {domain} without any add_chunk()")
        if self._chunk_sq_norms:
            expected = len(next(iter(self._chunk_sq_norms.values())))
            if num_chunks != expected:
                raise RuntimeError(
                    f"domain {domain} has {num_chunks} chunks but earlier domains have "
                    f"{expected}; every domain needs the same number of chunks"
                )
        self._chunk_sq_norms[domain] = torch.stack(self._current_chunk_sq_norms)
        self._sum_sq_norms[domain] = self._sum_of_squares([self._flat_sum])
        if self._sketch is not None and self._sketch.numel():
            self._fold_into_sketch(self._sketch[domain])
        self._current_domain = None

    def finalize(self, process_group: dist.ProcessGroup | None = None) -> GradientStatistics:
        """Combine all domains into ``GradientStatistics`` and reset for the next probe.

        With layout 'sharded' and torch.distributed initialised, the local partial sums are
        added across ``process_group`` (None = world) by one all-reduce, divided by ``replicas``.
        """
        missing = [k for k in range(self.num_domains) if k not in self._sum_sq_norms]
        if self._current_domain is not None or missing:
            raise RuntimeError(
                f"finalize() needs every domain ended; open: {self._current_domain}, "
                f"not collected: {missing}"
            )
        chunk_sq_norms = torch.stack([self._chunk_sq_norms[k] for k in range(self.num_domains)])
        sum_sq_norms = torch.stack([self._sum_sq_norms[k] for k in range(self.num_domains)])
        num_chunks = chunk_sq_norms.shape[1]
        partial_sums = [chunk_sq_norms.flatten(), sum_sq_norms]
        if self._sketch is not None:
            sketch = self._sketch.double()
            replicates = sketch.unbind(1)  # (K, buckets) each
            partial_sums.append((sum(r @ r.T for r in replicates) / len(replicates)).flatten())
            # Variance the sketch adds to each <S_j, S_k> (see the module docstring; 0 when exact):
            # sum_b (a1 b1 - a2 b2)^2 / 4 = [(a1^2)(b1^2) + (a2^2)(b2^2) - 2 (a1 a2)(b1 b2)] / 4
            if self._sketch_exact:
                partial_sums.append(torch.zeros(self.num_domains**2, dtype=torch.float64, device=sketch.device))
            else:
                first, second = (r.square() for r in replicates)
                product = replicates[0] * replicates[1]
                partial_sums.append(((first @ first.T + second @ second.T - 2 * product @ product.T) / 4).flatten())
        packed = torch.cat(partial_sums)
        if self.layout == "sharded" and dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
            packed = packed / self.replicas  # hybrid sharding: every replica added the same shard
        packed = packed.cpu()

        num_domains = self.num_domains
        num_chunk_entries = num_domains * num_chunks
        chunk_sq_norms = packed[:num_chunk_entries].view(num_domains, num_chunks)
        sum_sq_norms = packed[num_chunk_entries : num_chunk_entries + num_domains]
        grad_sq_norms, per_sample_variances = estimate_from_sums(
            sum_sq_norms,
            chunk_sq_norms.sum(dim=1),
            num_chunks=num_chunks,
            chunk_size=self.chunk_size,
        )
        cosines = inner_products = inner_product_sketch_var = None
        if self._sketch is not None:
            start = num_chunk_entries + num_domains
            cross_sums = packed[start : start + num_domains**2].view(num_domains, num_domains)
            cosines = pairwise_cosines(cross_sums, grad_sq_norms, num_chunks=num_chunks)
            inner_products = cross_sums / num_chunks**2
            inner_product_sketch_var = packed[start + num_domains**2 :].view(num_domains, num_domains)
            inner_product_sketch_var = inner_product_sketch_var / num_chunks**4
        self._start_cycle()
        return GradientStatistics(
            grad_sq_norms=grad_sq_norms,
            per_sample_variances=per_sample_variances,
            chunk_grad_sq_norms=chunk_sq_norms,
            cosines=cosines,
            inner_products=inner_products,
            inner_product_sketch_var=inner_product_sketch_var,
            num_chunks=num_chunks,
            chunk_size=self.chunk_size,
        )
