"""Tests for composer_pike.stats: estimator formulas, unbiasedness with real backward passes,
equivalence with a flat-vector reference, the conflict monitor, sharded partial sums, and
2-process runs under FSDP2, FSDP1 and DDP (gloo, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_helpers import free_port
from torch import nn

from composer_pike.stats import (
    GradientStatistics,
    GradientStatsAccumulator,
    PooledStatistics,
    cosine_intervals,
    estimate_from_sums,
    gradient_layout,
    gradient_sum_factor,
    local_gradient,
    pairwise_cosines,
)

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread is several times faster on a shared 2-core machine."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def run_accumulator(
    params: list[torch.Tensor],
    chunk_grads: list[list[list[torch.Tensor | None]]],
    *,
    chunk_size: int,
    conflict_sketch_size: int = 0,
    seed: int = 0,
    layout: str = "replicated",
) -> GradientStatistics:
    """A fresh accumulator fed with ``chunk_grads`` (see ``feed``), finalized."""
    accumulator = GradientStatsAccumulator(
        params,
        len(chunk_grads),
        chunk_size=chunk_size,
        conflict_sketch_size=conflict_sketch_size,
        seed=seed,
        layout=layout,
    )
    feed(accumulator, params, chunk_grads)
    return accumulator.finalize()


def feed(
    accumulator: GradientStatsAccumulator,
    params: list[torch.Tensor],
    chunk_grads: list[list[list[torch.Tensor | None]]],
) -> None:
    """Run a probe with precomputed gradients chunk_grads[domain][chunk][param] as p.grad."""
    for domain, chunks in enumerate(chunk_grads):
        accumulator.begin_domain(domain)
        for grads in chunks:
            for param, grad in zip(params, grads):
                param.grad = grad
            accumulator.add_chunk()
        accumulator.end_domain()


# ---------------------------------------------------------------------------------------------
# Formulas


def test_estimate_from_sums_exact():
    # Domain 0: chunk means (1, 0), (0, 1), (1, 1): S = (2, 2), ||S||^2 = 8, Q = 4.
    # Domain 1: chunk means (2, 0), (2, 0), (2, 0): no spread.
    grad_sq_norms, variances = estimate_from_sums(
        torch.tensor([8.0, 36.0]), torch.tensor([4.0, 12.0]), num_chunks=3, chunk_size=2
    )
    assert grad_sq_norms.dtype == variances.dtype == torch.float64
    # G is the mean off-diagonal inner product: (0 + 1 + 1) / 3; domain 1: 4.
    torch.testing.assert_close(grad_sq_norms, torch.tensor([2 / 3, 4.0], dtype=torch.float64))
    # sigma^2 = m * trace of the sample covariance of the chunk means: 2 * (12/9) / 2.
    torch.testing.assert_close(variances, torch.tensor([4 / 3, 0.0], dtype=torch.float64))


def test_estimate_from_sums_keeps_negative_and_rejects_one_chunk():
    grad_sq_norms, _ = estimate_from_sums(
        torch.tensor([1.0]), torch.tensor([3.0]), num_chunks=2, chunk_size=1
    )
    assert grad_sq_norms.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2 chunks"):
        estimate_from_sums(torch.tensor([1.0]), torch.tensor([1.0]), num_chunks=1, chunk_size=4)


def test_pairwise_cosines_exact():
    # <S_j, S_k> for M = 2 chunks, so inner products are cross_sums / 4.
    cross_sums = torch.tensor([[99.0, 8.0, 4.0], [8.0, 99.0, -2.0], [4.0, -2.0, 99.0]])
    cosines = pairwise_cosines(cross_sums, torch.tensor([4.0, 1.0, -0.5]), num_chunks=2)
    assert cosines.dtype == torch.float64
    assert cosines[0, 1].item() == pytest.approx(2.0 / (2.0 * 1.0))
    assert cosines[1, 0].item() == pytest.approx(1.0)
    assert torch.isnan(cosines[0, 2]) and torch.isnan(cosines[2, 1])
    torch.testing.assert_close(cosines.diagonal(), torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Unbiasedness on a model with known G and sigma^2


class ShiftedQuadratic(nn.Module):
    """theta in R^20, split over three parameters of different shapes.

    Per-sample loss 0.5 ||theta - mu_k||^2 + x . theta with x ~ N(0, s_k^2 I), so the
    per-sample gradient is (theta - mu_k) + x: G_k = ||theta - mu_k||^2, sigma_k^2 = 20 s_k^2.
    """

    dim = 20

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.matrix = nn.Parameter(theta[:6].view(2, 3).clone())
        self.vector = nn.Parameter(theta[6:10].clone())
        self.tail = nn.Parameter(theta[10:].clone())

    def theta(self) -> torch.Tensor:
        return torch.cat([self.matrix.flatten(), self.vector, self.tail])

    def chunk_loss(self, mu: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mean over the chunk's samples; ``noise`` is (m, 20)."""
        theta = self.theta()
        return (0.5 * (theta - mu).square().sum() + noise @ theta).mean()


SYNTHETIC_CHUNKS, SYNTHETIC_CHUNK_SIZE = 4, 2


def synthetic_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """theta and the K = 3 domain optima mu_k, with one aligned and one opposed pair."""
    generator = torch.Generator().manual_seed(7)
    theta = torch.randn(ShiftedQuadratic.dim, generator=generator, dtype=torch.float64)
    base, other, third = torch.randn(
        3, ShiftedQuadratic.dim, generator=generator, dtype=torch.float64
    )
    gradients = torch.stack([base, 0.8 * base + 0.6 * other, -0.5 * base + third])
    return theta, theta - gradients


def run_synthetic(
    noise_stds: list[float], repetitions: int, *, conflict_sketch_size: int
) -> dict[str, torch.Tensor]:
    """Independent probes on ShiftedQuadratic (float64); stacks the statistics over repetitions."""
    theta, mus = synthetic_problem()
    model = ShiftedQuadratic(theta).double()
    num_domains = len(noise_stds)
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(
        repetitions, num_domains, SYNTHETIC_CHUNKS, SYNTHETIC_CHUNK_SIZE, ShiftedQuadratic.dim,
        generator=generator, dtype=torch.float64,
    ) * torch.tensor(noise_stds, dtype=torch.float64).view(1, -1, 1, 1, 1)
    results: dict[str, list[torch.Tensor]] = {"G": [], "sigma2": [], "naive": [], "cosines": []}
    for repetition in range(repetitions):
        accumulator = GradientStatsAccumulator(
            list(model.parameters()), num_domains, chunk_size=SYNTHETIC_CHUNK_SIZE,
            conflict_sketch_size=conflict_sketch_size, seed=repetition,
        )
        for domain in range(num_domains):
            accumulator.begin_domain(domain)
            for chunk in range(SYNTHETIC_CHUNKS):
                model.zero_grad(set_to_none=True)
                model.chunk_loss(mus[domain], noise[repetition, domain, chunk]).backward()
                accumulator.add_chunk()
            accumulator.end_domain()
        stats = accumulator.finalize()
        # ||S||^2 recovered from the outputs: M (M - 1) G + Q.
        num_chunks = stats.num_chunks
        sum_of_sq = stats.chunk_grad_sq_norms.sum(1)
        sum_sq = num_chunks * (num_chunks - 1) * stats.grad_sq_norms + sum_of_sq
        results["G"].append(stats.grad_sq_norms)
        results["sigma2"].append(stats.per_sample_variances)
        results["naive"].append(sum_sq / num_chunks**2)
        results["cosines"].append(stats.cosines)
    return {name: torch.stack(values) for name, values in results.items()}


def true_synthetic_values(noise_stds: list[float]) -> dict[str, torch.Tensor]:
    theta, mus = synthetic_problem()
    gradients = theta - mus
    norms = gradients.norm(dim=1)
    return {
        "G": norms.square(),
        "sigma2": ShiftedQuadratic.dim * torch.tensor(noise_stds, dtype=torch.float64).square(),
        "cosines": (gradients @ gradients.T) / torch.outer(norms, norms),
    }


def assert_within_standard_errors(
    samples: torch.Tensor, truth: torch.Tensor, num_errors: float = 3.0
) -> None:
    """Mean over dim 0 of ``samples`` is within ``num_errors`` standard errors of ``truth``."""
    mean = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    deviation = (mean - truth).abs()
    assert torch.all(deviation <= num_errors * standard_error), (
        f"mean {mean.tolist()} vs truth {truth.tolist()} (standard error {standard_error.tolist()})"
    )


def off_diagonal(matrices: torch.Tensor) -> torch.Tensor:
    """Entries (j, k), j != k, of the trailing K x K dimensions."""
    num_domains = matrices.shape[-1]
    return matrices[..., ~torch.eye(num_domains, dtype=torch.bool)]


NOISE_STDS = [0.5, 1.0, 1.5]


@pytest.fixture(scope="module")
def synthetic_runs() -> dict[str, torch.Tensor]:
    return run_synthetic(NOISE_STDS, repetitions=400, conflict_sketch_size=4096)


def test_estimates_are_unbiased(synthetic_runs):
    truth = true_synthetic_values(NOISE_STDS)
    assert_within_standard_errors(synthetic_runs["G"], truth["G"])
    assert_within_standard_errors(synthetic_runs["sigma2"], truth["sigma2"])


def test_naive_squared_norm_is_biased(synthetic_runs):
    """Power check: ||S / M||^2 overshoots G by sigma^2 / (M m), and the test sees it."""
    truth = true_synthetic_values(NOISE_STDS)
    naive = synthetic_runs["naive"]
    standard_error = naive.std(0) / math.sqrt(naive.shape[0])
    assert torch.all(naive.mean(0) - truth["G"] > 5 * standard_error)
    bias = truth["sigma2"] / (SYNTHETIC_CHUNKS * SYNTHETIC_CHUNK_SIZE)
    assert_within_standard_errors(naive, truth["G"] + bias)


def test_conflict_monitor_is_consistent_under_noise(synthetic_runs):
    """Full sketch (stride 1), noisy gradients: the cosines centre on the true ones."""
    cosines = synthetic_runs["cosines"]
    truth = true_synthetic_values(NOISE_STDS)["cosines"]
    assert torch.all(cosines.diagonal(dim1=1, dim2=2) == 1)
    assert_within_standard_errors(off_diagonal(cosines), off_diagonal(truth))


def test_conflict_sketch_is_unbiased():
    """Noise-free gradients make G exact, so the cosines isolate the sketch (20 coordinates folded into
    2 x 3 buckets, fresh signs per seed)."""
    noise_free = [0.0, 0.0, 0.0]
    runs = run_synthetic(noise_free, repetitions=200, conflict_sketch_size=6)
    truth = true_synthetic_values(noise_free)
    torch.testing.assert_close(runs["G"], truth["G"].expand_as(runs["G"]))
    cosines = off_diagonal(runs["cosines"])
    assert torch.all(cosines.std(0) > 0.1)  # the sketch really subsamples
    assert_within_standard_errors(cosines, off_diagonal(truth["cosines"]))


def test_count_sketch_intervals_cover_heavy_tailed_gradients():
    """Noise-free gradients (G exact) with Student-t(2) coordinates (a few carry much of the energy),
    20000 of them folded into 2 x 251 buckets: the sketched inner product is unbiased and its +-1.96
    interval, from the two replicates' per-bucket differences, covers the truth at about its nominal
    rate. With at most m coordinates the sketch is exact."""
    rng = np.random.default_rng(8)
    shared = rng.standard_t(2, size=20000)
    first, second = shared + rng.standard_t(2, size=20000), 0.5 * shared + rng.standard_t(2, size=20000)
    params = [torch.zeros(20000, dtype=torch.float64)]
    grads = [[[torch.from_numpy(vector)]] * 2 for vector in (first, second)]
    truth = float(first @ second)
    estimates, covered = [], []
    for seed in range(300):
        stats = run_accumulator(params, grads, chunk_size=1, conflict_sketch_size=512, seed=seed)
        estimate, sketch_se = float(stats.inner_products[0, 1]), float(stats.inner_product_sketch_var[0, 1]) ** 0.5
        estimates.append(estimate)
        covered.append(abs(estimate - truth) <= 1.96 * sketch_se)
    estimates = np.array(estimates)
    assert abs(estimates.mean() - truth) <= 3 * estimates.std() / np.sqrt(estimates.size)
    assert estimates.std() > 0.05 * abs(truth)  # the sketch really folds
    assert 0.88 <= np.mean(covered) <= 0.99, np.mean(covered)
    full = run_accumulator(params, grads, chunk_size=1, conflict_sketch_size=20000)
    assert float(full.inner_products[0, 1]) == pytest.approx(truth, rel=1e-12)
    assert float(full.inner_product_sketch_var[0, 1]) == 0.0


# ---------------------------------------------------------------------------------------------
# Equivalence with a flat-vector reference


class MLPWithSideBranch(nn.Module):
    """An nn.Sequential MLP, a side branch used only in even chunks (grad None in odd ones)
    and a parameter that is never used (grad always None)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.side = nn.Linear(4, 3)
        self.unused = nn.Parameter(torch.zeros(5))

    def forward(self, inputs: torch.Tensor, use_side: bool) -> torch.Tensor:
        outputs = self.trunk(inputs)
        return outputs + self.side(inputs) if use_side else outputs


def reference_statistics(chunk_grads: torch.Tensor, chunk_size: int) -> dict[str, torch.Tensor]:
    """From flat chunk-mean gradients (K, M, D), by the textbook formulas: G as the mean
    off-diagonal inner product, sigma^2 as m times the sample covariance trace."""
    num_chunks = chunk_grads.shape[1]
    gram = chunk_grads @ chunk_grads.transpose(1, 2)
    off_diagonal_sum = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)
    grad_sq_norms = off_diagonal_sum / (num_chunks * (num_chunks - 1))
    deviations = chunk_grads - chunk_grads.mean(1, keepdim=True)
    variances = chunk_size * deviations.square().sum((1, 2)) / (num_chunks - 1)
    sums = chunk_grads.sum(1)
    inner_products = sums @ sums.T / num_chunks**2
    norms = grad_sq_norms.sqrt()
    return {
        "grad_sq_norms": grad_sq_norms,
        "per_sample_variances": variances,
        "chunk_grad_sq_norms": gram.diagonal(dim1=1, dim2=2),
        "cosines": (inner_products / torch.outer(norms, norms)).fill_diagonal_(1.0),
    }


@pytest.mark.parametrize(
    "dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-4)]
)
def test_matches_flat_reference(dtype, rtol):
    model = MLPWithSideBranch().to(dtype)
    params = list(model.parameters())
    num_domains, num_chunks, chunk_size = 3, 5, 4
    accumulator = GradientStatsAccumulator(
        params, num_domains, chunk_size=chunk_size, conflict_sketch_size=4096
    )
    generator = torch.Generator().manual_seed(5)
    num_coordinates = sum(p.numel() for p in params)
    flat_grads = torch.zeros(num_domains, num_chunks, num_coordinates, dtype=torch.float64)
    for domain in range(num_domains):
        accumulator.begin_domain(domain)
        for chunk in range(num_chunks):
            inputs = torch.randn(chunk_size, 4, generator=generator).to(dtype)
            targets = (torch.randn(chunk_size, 3, generator=generator) + 2 * domain - 1).to(dtype)
            model.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(inputs, use_side=chunk % 2 == 0), targets).backward()
            assert model.unused.grad is None
            assert (model.side.weight.grad is None) == (chunk % 2 == 1)
            accumulator.add_chunk()
            flat_grads[domain, chunk] = torch.cat(
                [torch.zeros(p.numel()) if p.grad is None else p.grad.double().flatten()
                 for p in params]
            )
        accumulator.end_domain()
    stats = accumulator.finalize()

    expected = reference_statistics(flat_grads, chunk_size)
    assert torch.all(expected["grad_sq_norms"] > 0)
    for name, value in expected.items():
        actual = getattr(stats, name)
        assert actual.dtype == torch.float64
        torch.testing.assert_close(actual, value, rtol=rtol, atol=0, msg=name)
    assert (stats.num_chunks, stats.chunk_size) == (num_chunks, chunk_size)


def test_sharded_partial_sums_add_up_to_full_statistics():
    """FSDP1 (use_orig_params) simulated: every rank's p.grad is a 1-D view of its slice of the
    flat gradient, possibly empty. Squared norms are additive over disjoint shards and G,
    sigma^2 are linear in them, so the two ranks' local results add up to the full ones
    (finalize's all-reduce does this sum on the packed partial sums)."""
    shapes = [(3, 2), (5,), (2,)]  # flat layout: [0, 6), [6, 11), [11, 13)
    rank_ranges = [(0, 7), (7, 13)]  # rank 0: first param + 1 element; rank 1: the rest
    num_domains, num_chunks, chunk_size = 3, 4, 8
    generator = torch.Generator().manual_seed(9)
    flat = torch.randn(num_domains, num_chunks, 13, generator=generator, dtype=torch.float64)
    flat += torch.randn(num_domains, 1, 13, generator=generator, dtype=torch.float64)
    param_ranges, start = [], 0
    for shape in shapes:
        param_ranges.append((start, start + math.prod(shape)))
        start += math.prod(shape)

    def grads_for(slices):
        return [
            [[None if lo == hi else flat[k, i, lo:hi].view(shape) for (lo, hi), shape in slices]
             for i in range(num_chunks)]
            for k in range(num_domains)
        ]

    full_slices = [(bounds, shape) for bounds, shape in zip(param_ranges, shapes)]
    full_params = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    full = run_accumulator(full_params, grads_for(full_slices), chunk_size=chunk_size)

    rank_stats = []
    for rank_lo, rank_hi in rank_ranges:
        slices = []
        for param_lo, param_hi in param_ranges:
            lo, hi = max(param_lo, rank_lo), min(param_hi, rank_hi)
            slices.append(((lo, max(lo, hi)), (max(hi - lo, 0),)))
        local_params = [torch.zeros(shape, dtype=torch.float64) for _, shape in slices]
        assert any(p.numel() == 0 for p in local_params)  # some shards are empty
        rank_stats.append(
            run_accumulator(
                local_params, grads_for(slices), chunk_size=chunk_size, layout="sharded"
            )
        )
    for name in ("grad_sq_norms", "per_sample_variances", "chunk_grad_sq_norms"):
        summed = getattr(rank_stats[0], name) + getattr(rank_stats[1], name)
        torch.testing.assert_close(summed, getattr(full, name), rtol=1e-12, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------
# API behaviour


def tiny_setup(num_domains: int = 2) -> tuple[nn.Linear, GradientStatsAccumulator]:
    model = nn.Linear(3, 1)
    return model, GradientStatsAccumulator(list(model.parameters()), num_domains, chunk_size=2)


def backward_once(model: nn.Linear) -> None:
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 3)).sum().backward()


def test_misuse_raises_clear_errors():
    model, accumulator = tiny_setup()
    with pytest.raises(RuntimeError, match="before begin_domain"):
        accumulator.add_chunk()
    with pytest.raises(RuntimeError, match="without an open domain"):
        accumulator.end_domain()
    with pytest.raises(RuntimeError, match="out of range"):
        accumulator.begin_domain(2)
    accumulator.begin_domain(0)
    with pytest.raises(RuntimeError, match="is open"):
        accumulator.begin_domain(1)
    with pytest.raises(RuntimeError, match="without any add_chunk"):
        accumulator.end_domain()
    for _ in range(3):
        backward_once(model)
        accumulator.add_chunk()
    accumulator.end_domain()
    with pytest.raises(RuntimeError, match="already collected"):
        accumulator.begin_domain(0)
    with pytest.raises(RuntimeError, match="every domain ended"):
        accumulator.finalize()
    accumulator.begin_domain(1)
    backward_once(model)
    accumulator.add_chunk()
    with pytest.raises(RuntimeError, match="every domain ended"):
        accumulator.finalize()
    with pytest.raises(RuntimeError, match="same number of chunks"):
        accumulator.end_domain()
    with pytest.raises(ValueError, match="layout"):
        GradientStatsAccumulator(list(model.parameters()), 2, chunk_size=2, layout="fsdp")


def test_single_chunk_per_domain_is_rejected_at_finalize():
    model, accumulator = tiny_setup(num_domains=1)
    accumulator.begin_domain(0)
    backward_once(model)
    accumulator.add_chunk()
    accumulator.end_domain()
    with pytest.raises(ValueError, match="at least 2 chunks"):
        accumulator.finalize()


def test_accumulator_is_reusable_after_finalize():
    params = [torch.zeros(4, 3), torch.zeros(7)]
    generator = torch.Generator().manual_seed(2)
    chunk_grads = [
        [[torch.randn(p.shape, generator=generator) for p in params] for _chunk in range(3)]
        for _domain in range(2)
    ]
    accumulator = GradientStatsAccumulator(params, 2, chunk_size=4, conflict_sketch_size=4096)
    results = []
    for _probe in range(2):
        feed(accumulator, params, chunk_grads)
        results.append(accumulator.finalize())
    for name in ("grad_sq_norms", "per_sample_variances", "chunk_grad_sq_norms", "cosines"):
        torch.testing.assert_close(getattr(results[0], name), getattr(results[1], name), msg=name)


def test_accumulator_rejects_a_model_spread_over_devices():
    params = [torch.zeros(4), torch.zeros(3, device="meta")]
    with pytest.raises(ValueError, match="several devices"):
        GradientStatsAccumulator(params, 2, chunk_size=4)


def test_local_gradient_and_layout_of_plain_modules():
    model = nn.Linear(3, 2)
    assert local_gradient(model.weight) is None
    model(torch.randn(4, 3)).sum().backward()
    assert local_gradient(model.weight) is model.weight.grad
    empty_shard = torch.zeros(0, requires_grad=True)
    empty_shard.grad = torch.zeros(0)
    assert local_gradient(empty_shard) is None
    assert gradient_layout(model) == "replicated"
    assert gradient_layout(nn.Sequential(model, nn.ReLU())) == "replicated"


# ---------------------------------------------------------------------------------------------
# Two processes: FSDP2, FSDP1 (use_orig_params) and DDP on gloo


def load_worker_module():
    path = TESTS_DIR / "dist_stats_worker.py"
    spec = importlib.util.spec_from_file_location("dist_stats_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_dist_stats_worker(out_dir: Path, nproc: int = 2, device: str = "cpu") -> list[dict]:
    """tests/dist_stats_worker.py on ``nproc`` processes; each rank's results (FSDP2, FSDP1, DDP)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(TESTS_DIR / "dist_stats_worker.py"), str(out_dir), device,
    ]
    completed = subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.mark.timeout(620)
def test_two_processes_match_single_process(tmp_path):
    rank_results = run_dist_stats_worker(tmp_path)
    assert rank_results[0] == rank_results[1]  # bit-identical on both ranks

    worker = load_worker_module()
    model = worker.build_model()
    assert gradient_sum_factor(model) == 1  # a single process (no process group) is never corrected
    reference = worker.collect_probe(model).finalize()
    # (layout, all-reduces in finalize, gradient_sum_factor): only FSDP2 on gloo is corrected
    expected = {"fsdp2": ("sharded", 1, 2), "fsdp1": ("sharded", 1, 1), "ddp": ("replicated", 0, 1)}
    for mode, (layout, all_reduce_calls, sum_factor) in expected.items():
        result = rank_results[0][mode]
        assert (result["layout"], result["all_reduce_calls"]) == (layout, all_reduce_calls), mode
        assert result["sum_factor"] == sum_factor, mode
        # The factor is the measured distortion: uncorrected statistics are sum_factor^2 too large
        # (the bug of pytorch#162338 on FSDP2; none on FSDP1 and DDP).
        for name in ("grad_sq_norms", "per_sample_variances"):
            torch.testing.assert_close(
                torch.tensor(result[f"raw_{name}"], dtype=torch.float64),
                sum_factor**2 * getattr(reference, name),
                rtol=1e-5, atol=1e-6, msg=f"{mode} uncorrected {name}",
            )
        for name in ("grad_sq_norms", "per_sample_variances", "chunk_grad_sq_norms", "cosines"):
            torch.testing.assert_close(
                torch.tensor(result[name], dtype=torch.float64), getattr(reference, name),
                rtol=1e-5, atol=1e-6, msg=f"{mode} {name}",
            )


@pytest.mark.timeout(620)
def test_hybrid_sharding_counts_each_gradient_coordinate_once(tmp_path):
    """Four processes: FSDP1 HYBRID_SHARD (shard groups of 2, two replicas) gives the single-process statistics
    once ``gradient_replicas`` divides the world-wide sums; without it every replica's identical shard is
    added again (G twice the truth). FSDP2 on a 2 x 2 mesh (HSDP) reports two replicas too."""
    rank_results = run_dist_stats_worker(tmp_path, nproc=4)
    assert all(result == rank_results[0] for result in rank_results)
    assert rank_results[0]["fsdp2_hsdp"] == {"layout": "sharded", "replicas": 2}
    hybrid = rank_results[0]["fsdp1_hybrid"]
    assert (hybrid["layout"], hybrid["replicas"]) == ("sharded", 2)
    reference = load_worker_module().collect_probe(load_worker_module().build_model()).finalize()
    torch.testing.assert_close(torch.tensor(hybrid["raw_grad_sq_norms"], dtype=torch.float64),
                               2 * reference.grad_sq_norms, rtol=1e-5, atol=1e-6)
    for name in ("grad_sq_norms", "per_sample_variances", "cosines", "inner_products"):
        torch.testing.assert_close(torch.tensor(hybrid[name], dtype=torch.float64), getattr(reference, name),
                                   rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Standard errors and pooling (PIKE_MATH.md s.9)


def gaussian_chunk_means(rng, mean, noise_eigs, num_chunks: int, chunk_size: int) -> np.ndarray:
    """(M, d) chunk-mean gradients: ``mean`` plus Gaussian noise of per-sample covariance diag(noise_eigs)."""
    return mean + rng.normal(size=(num_chunks, mean.size)) * np.sqrt(noise_eigs / chunk_size)


def probe_of(chunks: np.ndarray, chunk_size: int) -> tuple[float, float, np.ndarray]:
    """(G-hat, sigma^2-hat, chunk squared norms) of one domain, as the accumulator computes them."""
    sum_sq_norms = float(np.sum(chunks.sum(0) ** 2))
    chunk_sq_norms = np.sum(chunks**2, axis=1)
    grad, variance = estimate_from_sums(torch.tensor([sum_sq_norms]), torch.tensor([chunk_sq_norms.sum()]),
                                        num_chunks=chunks.shape[0], chunk_size=chunk_size)
    return grad.item(), variance.item(), chunk_sq_norms


def noise_model(noise_scale: float, effective_dim: str, aligned: bool, dim: int = 200):
    """A domain with sigma^2 = 1 (per sample), G = 1 / noise_scale, noise spread evenly over ``dim``
    directions or decaying, and the mean gradient drawn evenly or along the noisy directions."""
    rng = np.random.default_rng(7)
    eigs = np.ones(dim) if effective_dim == 'flat' else np.exp(-np.arange(dim) / 20.0)
    eigs /= eigs.sum()
    mean = rng.normal(size=dim) * (np.sqrt(eigs * dim) if aligned else 1.0)
    mean *= np.sqrt(1.0 / noise_scale / (mean @ mean))
    return mean, eigs


@pytest.mark.parametrize('noise_scale, effective_dim, aligned', [
    (20.0, 'flat', False), (200.0, 'decaying', False), (200.0, 'decaying', True), (2000.0, 'flat', False)])
def test_standard_errors_cover_the_truth_at_their_nominal_rate(noise_scale, effective_dim, aligned):
    """+-1.96 logged standard errors cover the true G and sigma^2 in about 95% of probes, per probe and
    pooled, once the noise shape has a few probes behind it (M = 8 chunks of 4 samples)."""
    mean, eigs = noise_model(noise_scale, effective_dim, aligned)
    true_grad, true_variance = float(mean @ mean), 1.0
    rng = np.random.default_rng(1)
    covered = {'grad': [], 'variance': [], 'pooled_grad': [], 'pooled_variance': []}
    for _ in range(150):
        pooled = PooledStatistics(1)
        for check in range(12):
            grad, variance, chunk_norms = probe_of(gaussian_chunk_means(rng, mean, eigs, 8, 4), 4)
            grad_se, variance_se = pooled.update([0], [grad], [variance], chunk_norms[None], [0.0], num_chunks=8,
                                                 chunk_size=4)
            if check >= 4:
                covered['grad'].append(abs(grad - true_grad) <= 1.96 * grad_se[0])
                covered['variance'].append(abs(variance - true_variance) <= 1.96 * variance_se[0])
                covered['pooled_grad'].append(
                    abs(pooled.grad_sq_norms[0] - true_grad) <= 1.96 * np.sqrt(pooled.grad_sq_var[0]))
                covered['pooled_variance'].append(
                    abs(pooled.per_sample_variances[0] - true_variance) <= 1.96 * np.sqrt(pooled.variance_var[0]))
    rates = {name: float(np.mean(values)) for name, values in covered.items()}
    assert all(0.89 <= rate <= 0.995 for rate in rates.values()), rates


def test_pooling_weights_probes_and_counts_effective_samples():
    pooled = PooledStatistics(3, decay=0.5, drift_z=np.inf)  # the arithmetic of plain decay
    norms = np.array([[1.0, 2.0], [3.0, 5.0]])
    pooled.update([0, 2], [1.0, 4.0], [10.0, 20.0], norms, [2.0, 3.0], num_chunks=2, chunk_size=4)
    pooled.update([0], [3.0], [30.0], norms[:1], [4.0], num_chunks=2, chunk_size=4)
    assert pooled.seen.tolist() == [True, False, True]
    assert pooled.grad_sq_norms[0] == pytest.approx((0.5 * 1.0 + 3.0) / 1.5)
    assert pooled.per_sample_variances[0] == pytest.approx((0.5 * 10 + 30) / 1.5)
    assert pooled.losses[0] == pytest.approx((0.5 * 2 + 4) / 1.5)
    assert pooled.grad_sq_norms[2] == 4.0 and np.isnan(pooled.grad_sq_norms[1])
    assert pooled.effective_samples[0] == pytest.approx(8 * 1.5**2 / 1.25)  # n (sum w)^2 / sum w^2
    assert pooled.effective_samples[2] == 8
    restored = PooledStatistics(3, decay=0.5, drift_z=np.inf)
    restored.load_state_dict(json.loads(json.dumps(pooled.state_dict())))
    for name in ('grad_sq_norms', 'grad_sq_var', 'noise_shape', 'effective_samples'):
        np.testing.assert_array_equal(getattr(restored, name), getattr(pooled, name))
    with pytest.raises(ValueError, match='3 domains'):
        PooledStatistics(3).load_state_dict({**pooled.state_dict(), 'weight': [1.0]})


def test_pooling_pools_inner_products_per_pair():
    """Pairs probed together pool like G (plain decay here); pairs never probed together stay unseen;
    a checkpoint from before the pair sums resumes with no pairs."""
    pooled = PooledStatistics(3, decay=0.5, drift_z=np.inf)
    norms = np.ones((3, 2))
    first = np.array([[9.0, 2.0], [2.0, 9.0]])  # diagonals are ignored
    pooled.update([0, 1], [1.0, 1.0], [4.0, 4.0], norms[:2], [0.0, 0.0], num_chunks=2, chunk_size=4,
                  inner_products=first, inner_product_sketch_var=np.zeros((2, 2)))
    assert pooled.pairs_seen.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    second = np.array([[0.0, 4.0, 1.0], [4.0, 0.0, 3.0], [1.0, 3.0, 0.0]])
    pooled.update([0, 1, 2], [1.0, 1.0, 1.0], [4.0, 4.0, 4.0], norms, [0.0] * 3, num_chunks=2, chunk_size=4,
                  inner_products=second, inner_product_sketch_var=np.full((3, 3), 0.25))
    expected = np.array([[0.0, (0.5 * 2 + 4) / 1.5, 1.0], [(0.5 * 2 + 4) / 1.5, 0.0, 3.0], [1.0, 3.0, 0.0]])
    np.testing.assert_allclose(pooled.inner_products, expected, rtol=1e-12)
    # Equal chunk norms measure no noise shape, so the sketch's variance is all there is: sum w^2 V / (sum w)^2
    older_pair = 0.25 / 1.5**2
    np.testing.assert_allclose(pooled.inner_product_var,
                               [[0.0, older_pair, 0.25], [older_pair, 0.0, 0.25], [0.25, 0.25, 0.0]], rtol=1e-12)
    restored = PooledStatistics(3, decay=0.5, drift_z=np.inf)
    restored.load_state_dict(json.loads(json.dumps(pooled.state_dict())))
    np.testing.assert_array_equal(restored.inner_products, pooled.inner_products)
    older = {name: value for name, value in pooled.state_dict().items() if not name.startswith('pair_')}
    restored.load_state_dict(older)
    assert not restored.pairs_seen.any() and restored.grad_sq_norms[0] == pooled.grad_sq_norms[0]


def test_pooling_forgets_by_checks_not_by_probes():
    """A domain probed every third check keeps decay^3 of its pool per probe: its memory spans as many
    checks as that of a domain probed at every check."""
    norms = np.array([[1.0, 2.0]])
    rotated, every = (PooledStatistics(1, decay=0.5, drift_z=np.inf) for _ in range(2))
    for value in (8.0, 2.0):
        rotated.update([0], [value], [1.0], norms, [0.0], num_chunks=2, chunk_size=4, checks_since_last_probe=3)
    assert rotated.grad_sq_norms[0] == pytest.approx((0.125 * 8 + 2) / 1.125)
    for value in (8.0, 8.0, 8.0, 2.0):
        every.update([0], [value], [1.0], norms, [0.0], num_chunks=2, chunk_size=4)
    assert every.grad_sq_norms[0] == pytest.approx((8 * (0.5 + 0.25 + 0.125) + 2) / 1.875)
    with pytest.raises(ValueError, match='checks_since_last_probe'):
        rotated.update([0], [1.0], [1.0], norms, [0.0], num_chunks=2, chunk_size=4, checks_since_last_probe=0)


def test_pooling_forgets_a_drift_far_outside_the_errors():
    """A probe z standard errors from the pool: nothing changes up to drift_z; beyond it the earlier probes
    keep exp(-(z^2 - drift_z^2) / 2) more of their weight; far beyond, the pool is the new probe."""
    mean, eigs = noise_model(50.0, 'flat', False)
    rng = np.random.default_rng(5)
    probes = [probe_of(gaussian_chunk_means(rng, mean, eigs, 8, 4), 4) for _ in range(6)]

    def pooled_after(last_grad: float, drift_z: float) -> PooledStatistics:
        pooled = PooledStatistics(1, decay=0.7, drift_z=drift_z)
        for grad, variance, norms in probes[:-1]:
            pooled.update([0], [grad], [variance], norms[None], [0.0], num_chunks=8, chunk_size=4)
        _, variance, norms = probes[-1]
        pooled.update([0], [last_grad], [variance], norms[None], [0.0], num_chunks=8, chunk_size=4)
        return pooled

    reference = pooled_after(probes[-1][0], np.inf)  # plain decay
    steady = pooled_after(probes[-1][0], 5.0)
    assert steady.last_drift[0] < 3  # a probe like the others: plain decay
    assert steady.grad_sq_norms[0] == reference.grad_sq_norms[0]
    old_weight = reference.weight[0] - 1.0  # the earlier probes' weight after one more decay
    pooled_se = np.sqrt(reference.grad_sq_var[0])
    for shift in (12.0, 16.0):  # the probe's own error is larger than the pool's: z lands above 5
        pooled = pooled_after(probes[-1][0] + shift * pooled_se, 5.0)
        z = pooled.last_drift[0]
        assert 5 < z < 12
        assert pooled.weight[0] - 1.0 == pytest.approx(old_weight * np.exp(-(z**2 - 25) / 2), rel=1e-9)
    far = pooled_after(1e6, 5.0)
    assert far.grad_sq_norms[0] == pytest.approx(1e6, rel=1e-9)  # the old pool is forgotten
    for drift_z, expected in ((5.0, 2.0), (np.inf, (0.7 * 1.0 + 2.0) / 1.7)):  # no error at all: z = inf
        exact = PooledStatistics(1, decay=0.7, drift_z=drift_z)
        for grad in (1.0, 2.0):
            exact.update([0], [grad], [0.0], np.ones((1, 2)), [0.0], num_chunks=2, chunk_size=1)
        assert exact.last_drift[0] == np.inf and exact.grad_sq_norms[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match='drift_z'):
        PooledStatistics(1, drift_z=0.0)


def test_every_domain_probed_together_forgets_when_one_drifts():
    """Domain 0's new probe lies far outside its pool's errors, domain 1's is like its earlier ones: both
    pools forget by domain 0's factor, so that they describe the same model; without a drift anywhere both
    decay plainly. Pairs forget by the same factor."""
    mean, eigs = noise_model(50.0, 'flat', False)
    rng = np.random.default_rng(7)
    probes = [[probe_of(gaussian_chunk_means(rng, mean, eigs, 8, 4), 4) for _ in range(2)] for _ in range(5)]

    def pooled_after(shift: float, drift_z: float) -> PooledStatistics:
        pooled = PooledStatistics(2, decay=0.7, drift_z=drift_z)
        for check, pair in enumerate(probes):
            grads = [grad + (shift if check == len(probes) - 1 and k == 0 else 0.0)
                     for k, (grad, _, _) in enumerate(pair)]
            pooled.update([0, 1], grads, [v for _, v, _ in pair], np.stack([n for _, _, n in pair]), [0.0, 0.0],
                          num_chunks=8, chunk_size=4, inner_products=np.ones((2, 2)),
                          inner_product_sketch_var=np.zeros((2, 2)))
        return pooled

    plain = pooled_after(0.0, np.inf)
    steady = pooled_after(0.0, 5.0)
    assert steady.last_drift.max() < 5
    np.testing.assert_array_equal(steady.weight, plain.weight)
    jump = pooled_after(14 * float(np.sqrt(plain.grad_sq_var[0])), 5.0)
    z0, z1 = jump.last_drift
    assert 5.5 < z0 < 8 and z1 < 5
    kept = np.exp(-(z0**2 - 25) / 2)
    np.testing.assert_allclose(jump.weight - 1.0, (plain.weight - 1.0) * kept, rtol=1e-9)  # domain 1 too
    assert jump.pair_weight[0, 1] - 1.0 == pytest.approx((plain.pair_weight[0, 1] - 1.0) * kept, rel=1e-9)
    assert jump.grad_sq_norms[1] == pytest.approx(probes[-1][1][0], rel=0.05)  # mostly domain 1's latest probe


def test_pooling_shrinks_the_standard_error_like_more_samples():
    mean, eigs = noise_model(200.0, 'decaying', False)
    rng = np.random.default_rng(3)
    single, pooled = PooledStatistics(1, decay=0.0), PooledStatistics(1, decay=0.8)
    for _ in range(40):
        chunks = gaussian_chunk_means(rng, mean, eigs, 8, 4)
        for statistics in (single, pooled):
            grad, variance, norms = probe_of(chunks, 4)
            statistics.update([0], [grad], [variance], norms[None], [0.0], num_chunks=8, chunk_size=4)
    assert pooled.effective_samples[0] == pytest.approx(32 * 9, rel=1e-3)  # (1 + 0.8) / (1 - 0.8) probes
    ratio = np.sqrt(pooled.grad_sq_var[0] / single.grad_sq_var[0])
    assert 0.25 < ratio < 0.45  # about 1 / sqrt(9)


def test_cosine_intervals_cover_the_truth():
    """Two domains at a known cosine: the +-1.96 interval covers it in about 95% of probes."""
    rng = np.random.default_rng(4)
    dim, chunk_size, num_chunks = 200, 4, 8
    eigs = np.full(dim, 1.0 / dim)
    first = rng.normal(size=dim)
    second = 0.3 * first / np.linalg.norm(first) + np.sqrt(1 - 0.09) * np.linalg.qr(
        np.stack([first, rng.normal(size=dim)], 1))[0][:, 1]
    means = np.stack([first / np.linalg.norm(first), second]) * np.sqrt(1 / 30.0)  # noise scale 30
    pooled = PooledStatistics(2)
    covered = []
    for check in range(300):
        chunks = [gaussian_chunk_means(rng, means[k], eigs, num_chunks, chunk_size) for k in range(2)]
        probes = [probe_of(c, chunk_size) for c in chunks]
        pooled.update([0, 1], [p[0] for p in probes], [p[1] for p in probes], np.stack([p[2] for p in probes]),
                      [0.0, 0.0], num_chunks=num_chunks, chunk_size=chunk_size)
        inner = np.array([[0.0, chunks[0].mean(0) @ chunks[1].mean(0)]] * 2)
        cosines, se = cosine_intervals(inner, np.zeros((2, 2)), pooled.grad_sq_norms, pooled.grad_sq_var,
                                       pooled.per_sample_variances, pooled.noise_shape, num_chunks=num_chunks,
                                       chunk_size=chunk_size)
        if check >= 10:
            covered.append(abs(cosines[0, 1] - 0.3) <= 1.96 * se[0, 1])
    assert 0.88 <= np.mean(covered) <= 0.995, np.mean(covered)
