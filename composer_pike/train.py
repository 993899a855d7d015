"""Train a causal LM on a pike-prep mixture from YAML: ``composer -n N -m composer_pike.train cfg.yaml k=v ...``.

The YAML is merged onto the typed schema below (omegaconf structured config), so an unknown or
misspelled key and a value of the wrong type fail before any data is touched, naming the key.
Dotlist overrides (``trainer.max_duration=200ba``) follow the YAML path.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from torch.utils.data import IterableDataset
from omegaconf.errors import ConfigKeyError, ValidationError

from composer_pike.policies import check_policy

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    manifest: str = MISSING              # pike-prep output: a directory, manifest.json, or s3://...
    cache_root: Optional[str] = None     # local cache for remote data (default: <save_folder or /tmp>/cache)
    global_batch_size: int = 32          # samples per optimizer step over all ranks
    num_workers: int = 2
    prefetch_factor: int = 2
    on_exhausted: str = 'repeat'         # repeat | drop | stop
    steps_per_epoch: Optional[int] = None
    eval_batch_size: int = 32            # per rank
    eval_max_batches: Optional[int] = None
    validate_hash: Optional[str] = 'xxh64'


@dataclass
class PiKEConfig:
    check_interval: int = 100
    estimation_batch_size: int = 64
    num_chunks: int = 8
    zeta1: Optional[float] = None
    zeta2: Optional[float] = None
    target_step: float = 0.3
    zeta_ratio: float = 1.0
    score_clip: float = 1.0
    min_weight: Optional[float] = None
    max_weight: float = 1.0
    max_epochs_per_domain: Optional[float] = None
    conflict_threshold: float = -0.2
    conflict_sketch_size: int = 65536
    probe_microbatch_size: Optional[int] = None


@dataclass
class MixingConfig:
    policy: str = 'pike'                 # pike | balanced_pike | mix | fixed | temperature | random | round_robin
    weights: Optional[dict[str, float]] = None  # fixed weights, or the prior for pike/mix/random
    temperature: float = 3.0             # for policy temperature (w ~ n^(1/T))
    tau: float = 3.0                     # for policy balanced_pike
    pike: PiKEConfig = field(default_factory=PiKEConfig)


@dataclass
class ModelConfig:
    family: str = 'gpt2'                 # gpt2 | llama (built from config, no download)
    pretrained_path: Optional[str] = None  # a local Hugging Face model directory instead
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup: str = '10ba'
    alpha_f: float = 0.1                 # final lr / peak lr of the cosine decay
    clip_norm: Optional[float] = 1.0


@dataclass
class TrainerConfig:
    max_duration: str = '200ba'
    precision: str = 'fp32'              # fp32 | amp_bf16 | amp_fp16
    device: Optional[str] = None         # cpu | gpu (default: gpu if available)
    device_train_microbatch_size: Optional[int] = None
    eval_interval: str = '50ba'
    save_folder: Optional[str] = None    # local path or s3://bucket/prefix
    save_interval: str = '100ba'
    save_num_checkpoints_to_keep: int = -1
    autoresume: bool = False
    fsdp: Optional[dict[str, Any]] = None  # Composer FSDP options; fsdp_version: 2 selects FSDP2
    progress_bar: bool = True
    console_log_interval: str = '10ba'
    log_file: Optional[str] = None       # metrics as JSON lines (default: <run_dir>/metrics.jsonl)


@dataclass
class TrainConfig:
    run_name: str = 'pike'
    run_dir: str = 'runs/${run_name}'
    seed: int = 17
    data: DataConfig = field(default_factory=DataConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigError(ValueError):
    """A configuration problem, reported in one line naming the key."""


def _suggest(key: str, node: Any) -> str:
    options = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    close = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else ''


def load_config(path: str | None, overrides: list[str] | None = None) -> DictConfig:
    """YAML file + dotlist overrides merged onto :class:`TrainConfig`, validated."""
    schema = OmegaConf.structured(TrainConfig)
    layers = [OmegaConf.load(path)] if path else []
    layers += [OmegaConf.from_dotlist(list(overrides or []))]
    try:
        config = OmegaConf.merge(schema, *layers)
        missing = sorted(OmegaConf.missing_keys(config))
        if missing:
            raise ConfigError(f'missing required key {missing[0]}')
        OmegaConf.resolve(config)
    except (ConfigKeyError, ValidationError) as error:
        key = getattr(error, 'full_key', None) or getattr(error, 'key', None) or '?'
        leaf = str(key).rsplit('.', 1)[-1]
        parent = _schema_node(str(key).rsplit('.', 1)[0] if '.' in str(key) else '')
        reason = str(error).splitlines()[0]
        raise ConfigError(f"config key '{key}': {reason}{_suggest(leaf, parent)}") from None
    check_policy(config.mixing.policy)
    if config.data.on_exhausted not in ('repeat', 'drop', 'stop'):
        raise ConfigError(f"config key 'data.on_exhausted': must be repeat, drop or stop, got "
                          f"'{config.data.on_exhausted}'")
    if config.model.family not in ('gpt2', 'llama'):
        raise ConfigError(f"config key 'model.family': must be gpt2 or llama, got '{config.model.family}'")
    return config


def _schema_node(path: str) -> Any:
    node: Any = TrainConfig()
    for part in filter(None, path.split('.')):
        node = getattr(node, part, None)
    return node


def build_model(config: DictConfig, vocab_size: int, seq_len: int, eos_token_id: int, pad_token_id: int):
    """A Composer HuggingFaceModel: a causal LM built from config (no download) or a local path."""
    import transformers
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel

    spec = config.model
    if spec.pretrained_path:
        network = transformers.AutoModelForCausalLM.from_pretrained(spec.pretrained_path, local_files_only=True)
    elif spec.family == 'gpt2':
        network = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=seq_len, n_embd=spec.d_model, n_layer=spec.n_layers,
            n_head=spec.n_heads, n_inner=spec.mlp_ratio * spec.d_model, bos_token_id=eos_token_id,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id))
    else:
        network = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=spec.d_model,
            intermediate_size=spec.mlp_ratio * spec.d_model, num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_heads, bos_token_id=eos_token_id,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id))
    return HuggingFaceModel(network, use_logits=True, metrics=[LanguageCrossEntropy()],
                            eval_metrics=[LanguageCrossEntropy()], shift_labels=True)


def build_evaluators(config: DictConfig, cache_root: str) -> list:
    """One Evaluator per domain over its val split, labelled ``val_<domain>``: held-out loss per domain."""
    from composer.core import Evaluator
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    from composer_pike.data import collate_samples, sources_from_manifest

    evaluators = []
    for index, source in enumerate(sources_from_manifest(config.data.manifest, 'val', cache_root)):
        local = source.local if source.remote is None else f'{source.local}-val'
        dataset = StreamingDataset(remote=source.remote, local=local, shuffle=False,
                                   batch_size=config.data.eval_batch_size, validate_hash=config.data.validate_hash)
        loader = DataLoader(ValSplit(dataset, index), batch_size=config.data.eval_batch_size,
                            collate_fn=collate_samples, num_workers=0)
        evaluators.append(Evaluator(label=f'val_{source.name}', dataloader=loader,
                                    metric_names=['LanguageCrossEntropy'],
                                    subset_num_batches=config.data.eval_max_batches or -1))
    return evaluators


class ValSplit(IterableDataset):
    """A domain's val StreamingDataset as ``(domain, index, tokens)`` items for :func:`collate_samples`."""

    def __init__(self, dataset: Any, domain: int) -> None:
        self.dataset = dataset
        self.domain = domain

    def __iter__(self):
        for index, sample in enumerate(self.dataset):
            yield self.domain, index, sample['tokens']

    def __len__(self) -> int:
        return len(self.dataset)


def parallelism_config(fsdp: DictConfig | None) -> dict[str, Any] | None:
    """Composer's parallelism_config from ``trainer.fsdp``; ``fsdp_version: 2`` selects FSDP2."""
    if not fsdp:
        return None
    options = OmegaConf.to_container(fsdp)
    if int(options.pop('fsdp_version', 1)) == 2:
        from composer.utils.parallelism import FSDP2Config
        return {'fsdp': FSDP2Config.from_compatible_attrs(options)}
    return {'fsdp': options}


def main(argv: list[str] | None = None) -> Any:
    """Parse ``CONFIG.yaml [key=value ...]``, build everything and run ``Trainer.fit``; returns the trainer."""
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv and not ('=' in argv[0] and not argv[0].endswith(('.yaml', '.yml'))) else None
    config = load_config(path, argv[1:] if path else argv)
    return train(config)


def train(config: DictConfig) -> Any:
    """Build data, model, algorithm and Trainer from a validated config and fit."""
    import torch
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.callbacks import LRMonitor
    from composer.loggers import FileLogger
    from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
    from composer.utils import dist, get_device, reproducibility

    from composer_pike.algorithm import PiKE
    from composer_pike.callbacks import DomainEvalSummary, JsonlLogger, MixtureMonitor
    from composer_pike.data import MixtureDataset, build_mixture_dataloader, read_manifest, sources_from_manifest
    from composer_pike.policies import plan_policy

    reproducibility.seed_all(config.seed)
    device = config.trainer.device or ('gpu' if torch.cuda.is_available() else 'cpu')
    # One process group before any StreamingDataset: otherwise each builds and tears down its own.
    dist.initialize_dist(get_device(device))
    os.makedirs(config.run_dir, exist_ok=True)
    cache_root = config.data.cache_root or os.path.join(config.run_dir, 'cache', f'node{dist.get_node_rank()}')
    manifest = read_manifest(config.data.manifest, cache_root)
    dataset = MixtureDataset(sources_from_manifest(config.data.manifest, 'train', cache_root),
                             validate_hash=config.data.validate_hash)
    mixing = config.mixing
    plan = plan_policy(mixing.policy, dataset.domain_names, dataset.domain_sizes,
                       weights=OmegaConf.to_container(mixing.weights) if mixing.weights else None,
                       temperature=mixing.temperature, tau=mixing.tau)
    loader = build_mixture_dataloader(dataset, config.data.global_batch_size, weights=plan.weights,
                                      batching=plan.batching, on_exhausted=config.data.on_exhausted,
                                      seed=config.seed, steps_per_epoch=config.data.steps_per_epoch,
                                      num_workers=config.data.num_workers,
                                      prefetch_factor=config.data.prefetch_factor)
    tokenizer = manifest['tokenizer']
    model = build_model(config, tokenizer['vocab_size'], dataset.seq_len, tokenizer['eos_token_id'],
                        tokenizer['pad_token_id'])
    algorithms: list[Any] = []
    if plan.adaptive:
        algorithms.append(PiKE(tau=plan.tau, **OmegaConf.to_container(mixing.pike)))
    if config.optimizer.clip_norm:
        algorithms.append(GradientClipping(clipping_type='norm', clipping_threshold=config.optimizer.clip_norm))
    optimizer = DecoupledAdamW(model.parameters(), lr=config.optimizer.lr, betas=tuple(config.optimizer.betas),
                               weight_decay=config.optimizer.weight_decay)
    scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=config.optimizer.warmup, alpha_f=config.optimizer.alpha_f)
    log_file = config.trainer.log_file or os.path.join(config.run_dir, 'metrics.jsonl')
    trainer = Trainer(
        run_name=config.run_name,
        model=model,
        train_dataloader=loader,
        eval_dataloader=build_evaluators(config, cache_root),
        eval_interval=config.trainer.eval_interval,
        max_duration=config.trainer.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=[LRMonitor(), DomainEvalSummary(), MixtureMonitor()],
        loggers=[FileLogger(os.path.join(config.run_dir, 'log.txt')), JsonlLogger(log_file)],
        precision=config.trainer.precision,
        device=device,
        device_train_microbatch_size=config.trainer.device_train_microbatch_size or
        ('auto' if device == 'gpu' else None),
        parallelism_config=parallelism_config(config.trainer.fsdp),
        save_folder=config.trainer.save_folder,
        save_interval=config.trainer.save_interval,
        save_num_checkpoints_to_keep=config.trainer.save_num_checkpoints_to_keep,
        save_overwrite=not config.trainer.autoresume,
        autoresume=config.trainer.autoresume,
        progress_bar=config.trainer.progress_bar,
        log_to_console=not config.trainer.progress_bar,
        console_log_interval=config.trainer.console_log_interval,
        seed=config.seed,
    )
    trainer.fit()
    return trainer


if __name__ == '__main__':
    try:
        main()
    except ConfigError as error:
        print(f'composer_pike.train: error: {error}', file=sys.stderr)
        sys.exit(2)
