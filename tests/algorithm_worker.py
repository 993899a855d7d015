"""Tiny end-to-end PiKE setup shared by tests/test_algorithm.py and its multi-process runs.

As a module it provides the builders (data, model, loader, recorder) the single-process tests
use. As a script it is the per-rank program of the two-process tests::

    python -m composer.cli.launcher -n 2 --master_port PORT tests/algorithm_worker.py OUT DATA MODE...

where every MODE (``fsdp2``, ``ddp``) trains the same tiny GPT-2 with PiKE for ``NUM_BATCHES``
batches on the MDS domains under ``DATA/<mode>/d<k>`` and every rank writes
``OUT/<mode>-rank<r>.json``: the PiKE metrics it logged (InMemoryLogger, every rank), the
planner's newest scheduled weights after every step, the (domain, sample_id) rows of its own
batch slice at every step and a digest of the full (unsharded) parameters after every step.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from composer import Callback, Event, State, Trainer
from composer.loggers import InMemoryLogger, Logger
from composer.models import HuggingFaceModel
from composer.utils import dist, reproducibility
from torch.utils.data.distributed import DistributedSampler

from composer_pike.algorithms import PiKE
from composer_pike.data import DomainSource, MixtureDataset, build_mixture_dataloader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mds_helpers import write_domains  # noqa: E402

SEQ_LEN = 16
VOCAB_SIZE = 4200
DOMAIN_SIZES = (60, 50, 40)
BATCH_SIZE = 8
MODEL_SEED = 17
NUM_BATCHES = 8
CHECK_INTERVAL = 2
ESTIMATION_BATCH_SIZE = 16
NUM_CHUNKS = 4
EXACT_SKETCH_SIZE = 1 << 18  # conflict_sketch_size: more than the test model's coordinates, so the sketch is exact


def write_data(root: str | os.PathLike, sizes: Sequence[int] = DOMAIN_SIZES) -> list[str]:
    """One small MDS domain per entry of ``sizes`` under ``root`` (see mds_helpers)."""
    return write_domains(str(root), list(sizes), seq_len=SEQ_LEN, samples_per_shard=10)


def domain_dirs(root: str | os.PathLike, num_domains: int = len(DOMAIN_SIZES)) -> list[str]:
    return [os.path.join(str(root), f'd{k}') for k in range(num_domains)]


def build_model(seed: int = MODEL_SEED, dropout: float = 0.0) -> HuggingFaceModel:
    """A 2-layer, 32-wide GPT-2 (about 0.16M parameters), identically initialised for a seed."""
    reproducibility.seed_all(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return HuggingFaceModel(transformers.GPT2LMHeadModel(config), use_logits=True)


def build_dataset(dirs: Sequence[str]) -> MixtureDataset:
    return MixtureDataset([DomainSource(f'd{k}', d) for k, d in enumerate(dirs)])


def build_loader(data: Sequence[str] | MixtureDataset, *, batch_size: int = BATCH_SIZE, num_workers: int = 0,
                 seed: int = 5, **kwargs: Any):
    """A mixture loader (fresh planner and sampler) over a MixtureDataset, or over a new one on ``data`` dirs.

    Reusing one MixtureDataset for many loaders matters in a long test process: every
    StreamingDataset built keeps ~12 file descriptors per StreamingDataset built before it open
    until exit (mosaicml-streaming's prefix search registers every SharedMemory it attaches with
    atexit), so fresh datasets per run exhaust the descriptor limit quadratically.
    """
    dataset = data if isinstance(data, MixtureDataset) else build_dataset(data)
    return build_mixture_dataloader(dataset, batch_size, num_workers=num_workers, seed=seed, **kwargs)


def sampler_is_distributed(loader: Any) -> bool:
    """Composer's DataSpec refuses a multi-rank map-style loader unless a sampler is a DistributedSampler."""
    return isinstance(loader.batch_sampler, DistributedSampler) or isinstance(loader.sampler, DistributedSampler)


def make_sampler_distributed(loader: Any) -> None:
    """Test-side stand-in for what composer_pike.data now does itself: let the batch sampler also be a DistributedSampler.

    The mixture sampler already slices each global batch per rank, so only the type changes
    (Composer then also calls ``set_epoch``, which DistributedSampler provides and which is inert here).
    """
    sampler = loader.batch_sampler
    if sampler_is_distributed(loader):
        return
    base = type(sampler)
    sampler.__class__ = type(f'Distributed{base.__name__}', (base, DistributedSampler), {})
    sampler.epoch = 0


def param_digest(model: torch.nn.Module) -> list[float]:
    """(sum, sum of squares, a weighted sum) of every full parameter, in float64 (collective under FSDP2)."""
    digest = []
    for param in model.parameters():
        full = param.full_tensor() if hasattr(param, 'full_tensor') else param
        values = full.detach().double().flatten()
        ramp = torch.linspace(-1, 1, values.numel(), dtype=torch.float64)
        digest += [float(values.sum()), float(values.square().sum()), float((values * ramp).sum())]
    return digest


class Recorder(Callback):
    """Records, per training step, the rows this rank trained on and the mixture's newest schedule.

    ``rows[s]`` = list of (domain, sample_id) of this rank's batch at step ``s`` (read at
    AFTER_DATALOADER); ``schedules[s]`` = (effective step, weights) of the planner's newest
    scheduled weights at BATCH_END of step ``s`` (callbacks run after algorithms);
    ``digests[s]`` = :func:`param_digest` after step ``s`` when ``digest`` is set.
    """

    def __init__(self, digest: bool = False) -> None:
        self.rows: dict[int, list[tuple[int, int]]] = {}
        self.schedules: dict[int, tuple[int, list[float]]] = {}
        self.digests: dict[int, list[float]] = {}
        self.digest = digest

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_DATALOADER:
            batch = state.batch
            self.rows[int(state.timestamp.batch)] = list(zip(batch['domain'].tolist(), batch['sample_id'].tolist()))
        elif event == Event.BATCH_END:
            step = int(state.timestamp.batch) - 1
            mixture = state.train_dataloader.dataset
            start, weights = mixture.planner.schedule[-1]
            self.schedules[step] = (int(start), [float(w) for w in weights])
            if self.digest:
                self.digests[step] = param_digest(state.model)


def pike_series(logger: InMemoryLogger) -> dict[str, list[tuple[int, float]]]:
    """Every ``pike/*`` and ``mixture/*`` metric as [(timestamp.batch at logging, value), ...]."""
    return {key: [(int(ts.batch), float(value)) for ts, value in values]
            for key, values in logger.data.items() if key.startswith(('pike/', 'mixture/'))}


def make_pike(**overrides: Any) -> PiKE:
    # evidence_z=0: every check moves the weights, which the mechanics tests need (whether weights move on
    # evidence is tested in test_known_answers.py); first_check=0: they compare the first check's statistics
    # with the untrained model's gradients; an exact gradient sketch (conflict_sketch_size above the model's 0.16M
    # coordinates): the alignment terms then match across layouts up to float rounding, where a folded sketch
    # folds one process's and each FSDP2 shard's coordinates differently (equal in expectation, not digit for
    # digit; the folding is tested in test_stats.py)
    kwargs = dict(check_interval=CHECK_INTERVAL, estimation_batch_size=ESTIMATION_BATCH_SIZE, num_chunks=NUM_CHUNKS,
                  evidence_z=0.0, first_check=0, conflict_sketch_size=EXACT_SKETCH_SIZE)
    kwargs.update(overrides)
    return PiKE(**kwargs)


def run_mode(out: Path, data_root: Path, mode: str) -> None:
    from composer.utils.parallelism import FSDP2Config

    model = build_model()
    loader = build_loader(domain_dirs(data_root / mode), num_workers=0)
    distributed_sampler = sampler_is_distributed(loader)
    make_sampler_distributed(loader)
    memory = InMemoryLogger()
    recorder = Recorder(digest=True)
    parallelism = {'fsdp': FSDP2Config()} if mode == 'fsdp2' else None
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{NUM_BATCHES}ba', algorithms=[make_pike()],
                      callbacks=[recorder], loggers=[memory], device='cpu', progress_bar=False, seed=3,
                      parallelism_config=parallelism,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3))
    trainer.fit()
    result = {
        'world_size': dist.get_world_size(),
        'sampler_is_distributed': distributed_sampler,
        'metrics': pike_series(memory),
        'rows': {str(s): r for s, r in recorder.rows.items()},
        'schedules': {str(s): v for s, v in recorder.schedules.items()},
        'digests': {str(s): v for s, v in recorder.digests.items()},
        'param_types': sorted({type(p).__name__ for p in trainer.state.model.parameters()}),
        'model_type': type(trainer.state.model).__name__,
        'delay': loader.batch_sampler.delay,
    }
    (out / f'{mode}-rank{dist.get_global_rank()}.json').write_text(json.dumps(result))
    trainer.close()
    del trainer, loader
    dist.barrier()


def main(argv: list[str]) -> None:
    from composer.devices import DeviceCPU

    torch.set_num_threads(1)
    # Initialise torch.distributed once, before any StreamingDataset exists, as a training script
    # should: otherwise every StreamingDataset (K per MixtureDataset, plus clean_stale_shared_memory)
    # initialises and destroys its own gloo group on MASTER_PORT before the Trainer makes the real
    # one, and those back-to-back TCPStore cycles race ("DistNetworkError: Broken pipe" seen on rank 1).
    dist.initialize_dist(DeviceCPU())
    out, data_root, modes = Path(argv[0]), Path(argv[1]), argv[2:]
    for mode in modes:
        run_mode(out, data_root, mode)


if __name__ == '__main__':
    main(sys.argv[1:])
