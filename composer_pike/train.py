"""Train a causal LM on a pike-prep mixture from YAML: ``composer -n N -m composer_pike.train cfg.yaml k=v ...``.

The YAML is merged onto the typed schema below (omegaconf structured config). :func:`load_config`
rejects an unknown or misspelled key, a wrongly typed value, an unknown choice (policy, precision,
FSDP option, logger option, ...) and a bad duration string with one message naming the key and the
closest valid name. :func:`train` then checks what depends on the machine (a GPU for FSDP1 and
mixed precision, optional logger packages) and only then reads the manifest and the data.
Dotlist overrides (``trainer.max_duration=200ba``) follow the YAML path.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from composer_pike.policies import check_policy, named_weights, policy_adaptation


@dataclass
class DataConfig:
    manifest: str = MISSING              # pike-prep output: a directory, manifest.json, or s3://...
    cache_root: Optional[str] = None     # local cache for remote data (default: <run_dir>/cache/node<N>)
    global_batch_size: int = 32          # samples per optimizer step over all ranks
    num_workers: int = 2
    prefetch_factor: int = 2
    on_exhausted: str = 'repeat'         # repeat | drop | stop
    steps_per_epoch: Optional[int] = None
    eval_batch_size: int = 32            # per rank
    eval_max_batches: Optional[int] = None
    validate_hash: Optional[str] = 'xxh64'  # shards are checked before they are read; null: not at all
    download_retry: int = 3              # attempts after a failed one, per remote file and for the manifest
    download_timeout: float = 60         # seconds per remote file download


@dataclass
class PiKEConfig:
    check_interval: int = 1000           # the paper's T0 (every default here is composer_pike.PiKE's)
    first_check: Optional[int] = None    # batch of the first check (it probes every domain); None: check_interval
    estimation_batch_size: int = 256     # probe samples per probed domain per check (the paper's)
    num_chunks: int = 8
    domains_per_check: Optional[int] = None  # None: all domains up to 8, else 8 in rotation
    update: str = 'evidence'             # evidence | paper (explicit zeta1/zeta2) | kkt (mixing.policy=pike_kkt)
    alignment: Optional[bool] = None     # add sum_j <grad L_j, grad L_k> to scores; None: on (evidence, sketch)
    step_size: float = 0.5               # nats per check per unit of the domains' gradient signal (evidence)
    evidence_z: float = 2.5              # standard errors a score difference must exceed (evidence)
    zeta_ratio: Any = 'auto'             # zeta2/zeta1: 'auto' = b / (b + noise scale), or a number
    zeta1: Optional[float] = None        # update=paper only
    zeta2: Optional[float] = None        # update=paper only
    smoothness: Any = 'auto'             # L of the descent bound (kkt): 'auto' or a number
    beta: float = 1.0                    # kkt
    gamma: float = 1.0                   # kkt
    pool_decay: float = 0.7              # weight of a domain's earlier probes per check since
    drift_z: float = 5.0                 # forget a domain's pool faster when a probe differs by this many SE
    score_clip: float = 1.0
    min_weight: Optional[float] = None   # default max(0.05/K, 1/b): one sample per batch
    max_weight: float = 1.0
    max_epochs_per_domain: Optional[float] = None
    conflict_threshold: float = -0.2
    conflict_sketch_size: int = 65536
    probe_microbatch_size: Optional[int] = None


@dataclass
class LossSlopeConfig:                   # mixing.policy=loss_slope or balanced_loss_slope (composer_pike.LossSlope)
    check_interval: int = 100            # steps per bin and between weight updates
    window: float = 2.0                  # fit over each domain's last window-fold of samples
    step_size: float = 0.5               # nats per check for twice the mixture's elasticity per weight
    evidence_z: float = 2.5              # standard errors an advantage must exceed before weights move
    score_clip: float = 1.0              # most nats a log-weight moves per check
    min_weight: Optional[float] = None   # default max(0.05/K, 1/b): one sample per batch
    max_weight: float = 1.0
    max_epochs_per_domain: Optional[float] = None


@dataclass
class MixingConfig:
    policy: str = 'pike'                 # pike | balanced_pike | pike_kkt | loss_slope | balanced_loss_slope
                                         # | mix | fixed | temperature | random | round_robin
    weights: Optional[dict[str, float]] = None  # fixed weights, or the prior for the adaptive policies, mix, random
    preset: Optional[str] = None         # a name in `presets`: its weights become `weights`
    presets: dict[str, Optional[dict[str, float]]] = field(default_factory=dict)  # named weight sets; ??? = unset
    temperature: float = 3.0             # for policy temperature (w ~ n^(1/T))
    tau: float = 3.0                     # for policies balanced_pike and balanced_loss_slope
    pike: PiKEConfig = field(default_factory=PiKEConfig)
    loss_slope: LossSlopeConfig = field(default_factory=LossSlopeConfig)


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
    # Composer's DecoupledAdamW multiplies the weights by (1 - weight_decay * lr / peak lr) every step:
    # not scaled by lr, so torch AdamW's 0.1 at lr 1e-3 is 1e-4 here (0.1 would shrink them 10% a step).
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup: str = '10ba'
    alpha_f: float = 0.1                 # final lr / peak lr of the cosine decay
    clip_norm: Optional[float] = 1.0


@dataclass
class TrainerConfig:
    max_duration: str = '200ba'
    precision: str = 'fp32'              # fp32 | amp_bf16 | amp_fp16 | amp_fp8 (the amp ones need a GPU)
    device: Optional[str] = None         # cpu | gpu (default: gpu if available)
    device_train_microbatch_size: Optional[int] = None  # default: auto on GPU, the whole rank batch on CPU
    eval_interval: str = '50ba'
    save_folder: Optional[str] = None    # local path or s3://bucket/prefix ({run_name} is filled in)
    save_interval: str = '100ba'
    save_num_checkpoints_to_keep: int = -1
    autoresume: bool = False             # resume from the latest checkpoint in save_folder (needs save_folder)
    fsdp: Optional[dict[str, Any]] = None  # Composer FSDP options; fsdp_version: 1 | 2 (default: $FSDP_VERSION or 1)
    progress_bar: bool = True
    console_log_interval: str = '10ba'   # console lines when progress_bar is off
    log_file: Optional[str] = None       # JSON-lines metrics (default <run_dir>/metrics.jsonl); {rank}: one per rank


@dataclass
class LoggersConfig:
    """Experiment trackers: the Composer logger's arguments as a mapping ({} = its defaults); null = off."""
    wandb: Optional[dict[str, Any]] = None        # composer.loggers.WandBLogger (needs `pip install wandb`)
    mlflow: Optional[dict[str, Any]] = None       # composer.loggers.MLFlowLogger (needs `pip install mlflow`)
    tensorboard: Optional[dict[str, Any]] = None  # composer.loggers.TensorboardLogger (needs `pip install tensorboard`)


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
    loggers: LoggersConfig = field(default_factory=LoggersConfig)


# name -> (Composer logger class, the package it needs)
OPTIONAL_LOGGERS = {'wandb': ('WandBLogger', 'wandb'), 'mlflow': ('MLFlowLogger', 'mlflow'),
                    'tensorboard': ('TensorboardLogger', 'tensorboard')}
DURATION_KEYS = ('trainer.max_duration', 'trainer.eval_interval', 'trainer.save_interval',
                 'trainer.console_log_interval', 'optimizer.warmup')
TOKENIZER_KEYS = ('vocab_size', 'eos_token_id', 'pad_token_id')  # what the model needs from a manifest


class ConfigError(ValueError):
    """A configuration problem, reported in one line naming the key."""


def _closest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else ''


def _choice(key: str, value: Any, options: Sequence[Any]) -> None:
    if value not in options:
        raise ConfigError(f"config key '{key}': must be one of {', '.join(map(str, options))}, got "
                          f"'{value}'{_closest(str(value), map(str, options))}")


def load_config(path: str | None, overrides: list[str] | None = None) -> DictConfig:
    """YAML file + dotlist overrides merged onto :class:`TrainConfig`, validated (see :func:`validate`)."""
    import yaml

    schema = OmegaConf.structured(TrainConfig)
    try:
        layers = [OmegaConf.load(path)] if path else []
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f'{path}: ' + ' '.join(str(error).split())) from None
    layers += [OmegaConf.from_dotlist(list(overrides or []))]
    try:
        config = OmegaConf.merge(schema, *layers)
        # Unset presets (???) are placeholders: an error only when selected (validate).
        missing = sorted(k for k in OmegaConf.missing_keys(config) if not k.startswith('mixing.presets.'))
        if missing:
            raise ConfigError(f"missing required key '{missing[0]}'")
        OmegaConf.resolve(config)
    except (ConfigKeyError, ValidationError) as error:
        key = str(getattr(error, 'full_key', None) or getattr(error, 'key', None) or '?')
        parent = _schema_node(key.rsplit('.', 1)[0] if '.' in key else '')
        options = [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []
        reason = str(error).splitlines()[0]
        raise ConfigError(f"config key '{key}': {reason}{_closest(key.rsplit('.', 1)[-1], options)}") from None
    validate(config)
    return config


def _schema_node(path: str) -> Any:
    node: Any = TrainConfig()
    for part in filter(None, path.split('.')):
        node = getattr(node, part, None)
    return node


def validate(config: DictConfig) -> None:
    """Value checks beyond the schema's types; resolves ``mixing.preset`` into ``mixing.weights``."""
    import composer.loggers
    from composer.core import Precision, Time

    from composer_pike.algorithms import LossSlope, PiKE
    from composer_pike.algorithms.pike import UPDATES

    try:
        check_policy(config.mixing.policy)
    except ValueError as error:
        raise ConfigError(f"config key 'mixing.policy': {error}") from None
    _choice('data.on_exhausted', config.data.on_exhausted, ('repeat', 'drop', 'stop'))
    if config.data.download_retry < 1:
        raise ConfigError(f"config key 'data.download_retry': must be at least 1, got {config.data.download_retry}")
    if not config.data.download_timeout > 0:
        raise ConfigError(f"config key 'data.download_timeout': must be positive seconds, "
                          f"got {config.data.download_timeout}")
    for key, least in (('data.global_batch_size', 1), ('data.eval_batch_size', 1), ('data.num_workers', 0),
                       ('data.prefetch_factor', 1), ('data.steps_per_epoch', 1), ('data.eval_max_batches', 1)):
        value = OmegaConf.select(config, key)
        if value is not None and value < least:
            raise ConfigError(f"config key '{key}': must be at least {least}, got {value}")
    if not config.mixing.temperature > 0:
        raise ConfigError(f"config key 'mixing.temperature': must be > 0 (w ~ n^(1/T)), "
                          f"got {config.mixing.temperature}")
    _choice('model.family', config.model.family, ('gpt2', 'llama'))
    _choice('mixing.pike.update', config.mixing.pike['update'], UPDATES)  # .update is DictConfig's method
    _choice('trainer.precision', config.trainer.precision, [p.value for p in Precision])
    _choice('trainer.device', config.trainer.device, (None, 'cpu', 'gpu'))
    for key in DURATION_KEYS:
        value = OmegaConf.select(config, key)
        try:
            Time.from_timestring(value)
        except ValueError:
            raise ConfigError(f"config key '{key}': '{value}' is not a duration; write e.g. 100ba (batches), "
                              f"1ep, 2048sp (samples), 1000000tok or 0.5dur") from None
    _resolve_preset(config.mixing)
    if config.mixing.policy == 'fixed' and not config.mixing.weights:
        raise ConfigError("config key 'mixing.weights': mixing.policy=fixed needs mixing.weights or mixing.preset"
                          + (f" (presets: {', '.join(config.mixing.presets)})" if config.mixing.presets else ''))
    if config.mixing.weights:  # the values here; the domain names against the manifest in train()
        try:
            named_weights(dict(config.mixing.weights), list(config.mixing.weights))
        except ValueError as error:
            raise ConfigError(f"config key 'mixing.weights': {error}") from None
    if not config.mixing.tau >= 0:
        raise ConfigError(f"config key 'mixing.tau': the Balanced temperature must be >= 0, got {config.mixing.tau}")
    try:
        PiKE(**pike_options(config.mixing))
    except ValueError as error:
        raise ConfigError(f"config key 'mixing.pike': {error}") from None
    try:
        LossSlope(**loss_slope_options(config.mixing))
    except ValueError as error:
        raise ConfigError(f"config key 'mixing.loss_slope': {error}") from None
    parallelism_config(config.trainer.fsdp)
    for name, options in config.loggers.items():
        if options is not None:
            accepted = inspect.signature(getattr(composer.loggers, OPTIONAL_LOGGERS[name][0])).parameters
            for option in options:
                if option not in accepted:
                    raise ConfigError(f"config key 'loggers.{name}.{option}': not an option of "
                                      f"{OPTIONAL_LOGGERS[name][0]}{_closest(option, accepted)}")
    if config.trainer.autoresume and not config.trainer.save_folder:
        raise ConfigError("config key 'trainer.autoresume': needs trainer.save_folder (a local path or s3://...)")


def pike_options(mixing: DictConfig) -> dict[str, Any]:
    """The PiKE constructor's arguments for ``mixing``: ``mixing.pike``, the policy's tau and update rule."""
    plan = policy_adaptation(mixing.policy, tau=mixing.tau)
    options = OmegaConf.to_container(mixing.pike)
    if plan.update and options['update'] not in ('evidence', plan.update):
        raise ValueError(f"mixing.policy={mixing.policy} uses update={plan.update}, got update={options['update']}")
    return {**options, 'tau': plan.tau, 'update': plan.update or options['update']}


def loss_slope_options(mixing: DictConfig) -> dict[str, Any]:
    """The LossSlope constructor's arguments for ``mixing``: ``mixing.loss_slope`` and the policy's tau."""
    return {**OmegaConf.to_container(mixing.loss_slope), 'tau': policy_adaptation(mixing.policy, tau=mixing.tau).tau}


def _resolve_preset(mixing: DictConfig) -> None:
    if mixing.preset is None:
        return
    name = mixing.preset
    if name not in mixing.presets:
        raise ConfigError(f"config key 'mixing.preset': no preset '{name}'{_closest(name, mixing.presets)} "
                          f"(presets: {', '.join(mixing.presets) or 'none'})")
    if mixing.weights:
        raise ConfigError("config key 'mixing.preset': set mixing.preset or mixing.weights, not both")
    weights = mixing.presets[name]
    unset = [] if weights is None else [d for d in weights if OmegaConf.is_missing(weights, d)]
    if weights is None or unset:
        raise ConfigError(f"config key 'mixing.presets.{name}': a placeholder without numbers"
                          f"{' for ' + ', '.join(unset) if unset else ''}; fill in the weights before selecting it")
    mixing.weights = weights


def fsdp_version(fsdp: DictConfig | None) -> int | None:
    """1 (FSDP1) or 2 (FSDP2) from ``trainer.fsdp.fsdp_version``, else ``$FSDP_VERSION`` (Composer's switch), else 1."""
    if fsdp is None:
        return None
    version = fsdp.get('fsdp_version', None) or int(os.environ.get('FSDP_VERSION', 1))
    _choice('trainer.fsdp.fsdp_version', version, (1, 2))
    return version


def parallelism_config(fsdp: DictConfig | None) -> dict[str, Any] | None:
    """Composer's parallelism_config from ``trainer.fsdp``: an FSDP2Config or FSDPConfig.

    An option of neither version fails naming it; an option only the other version has (FSDP1's
    ``sharding_strategy`` under FSDP2, say) is dropped with a warning, so ``fsdp_version`` alone
    switches a config between the two.
    """
    version = fsdp_version(fsdp)
    if version is None:
        return None
    from composer.utils.parallelism import FSDP2Config, FSDPConfig

    def names(kind: type) -> list[str]:
        return [f.name for f in dataclasses.fields(kind) if not f.name.startswith('_')]

    kind, other = (FSDP2Config, FSDPConfig) if version == 2 else (FSDPConfig, FSDP2Config)
    options = {}
    for option, value in OmegaConf.to_container(fsdp).items():
        if option == 'fsdp_version':
            continue
        if option in names(kind):
            options[option] = value
        elif option in names(other):
            warnings.warn(f'trainer.fsdp.{option} is an FSDP{3 - version} option: ignored under FSDP{version}')
        else:
            raise ConfigError(f"config key 'trainer.fsdp.{option}': not an FSDP option"
                              f"{_closest(option, names(FSDPConfig) + names(FSDP2Config))}")
    try:
        return {'fsdp': kind(**options)}
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key 'trainer.fsdp': {error}") from None


def check_machine(config: DictConfig, device: str) -> None:
    """What the config asks of this machine: a GPU for gpu/FSDP1/mixed precision."""
    import torch

    if device == 'gpu' and not torch.cuda.is_available():
        raise ConfigError("config key 'trainer.device': gpu, but torch sees no GPU; set trainer.device=cpu")
    if device == 'cpu':
        if config.trainer.precision != 'fp32':
            raise ConfigError(f"config key 'trainer.precision': {config.trainer.precision} needs a GPU "
                              f"(Composer allows only fp32 on CPU); set trainer.precision=fp32")
        if fsdp_version(config.trainer.fsdp) == 1:
            raise ConfigError("config key 'trainer.fsdp': FSDP1 needs a GPU (Composer calls torch.cuda); "
                              "set trainer.fsdp.fsdp_version=2 on CPU")


def build_loggers(config: DictConfig) -> list:
    """The configured optional loggers; a missing package is a :class:`ConfigError` naming the key."""
    import composer.loggers
    from composer.utils import MissingConditionalImportError

    loggers = []
    for name, options in config.loggers.items():
        if options is None:
            continue
        class_name, package = OPTIONAL_LOGGERS[name]
        try:
            loggers.append(getattr(composer.loggers, class_name)(**OmegaConf.to_container(options)))
        except MissingConditionalImportError:
            raise ConfigError(f"config key 'loggers.{name}': {class_name} is configured but the '{package}' "
                              f"package is not installed (pip install {package})") from None
    return loggers


def build_model(config: DictConfig, vocab_size: int, seq_len: int, eos_token_id: int, pad_token_id: int):
    """A Composer HuggingFaceModel: a causal LM built from config (no download) or a local path."""
    import transformers
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel

    spec = config.model
    if spec.pretrained_path:
        network = transformers.AutoModelForCausalLM.from_pretrained(spec.pretrained_path, local_files_only=True)
        model_vocab = network.get_input_embeddings().num_embeddings
        positions = (getattr(network.config, 'max_position_embeddings', None)
                     or getattr(network.config, 'n_positions', None))
        if model_vocab < vocab_size or (positions is not None and positions < seq_len):
            raise ConfigError(f"config key 'model.pretrained_path': {spec.pretrained_path} has {model_vocab} token "
                              f"embeddings and {positions} positions; the data needs token ids below {vocab_size} "
                              f"and {seq_len} positions")
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


def build_evaluators(config: DictConfig, manifest: dict[str, Any], cache_root: str) -> list:
    """One Evaluator per domain over its val split, labelled ``val_<domain>``: held-out loss per domain.

    ``manifest`` is the description ``read_manifest`` loaded from ``data.manifest`` for training.
    """
    from composer.core import Evaluator

    from composer_pike.data import build_domain_eval_loader, manifest_sources

    data = config.data
    return [Evaluator(label=f'val_{source.name}', metric_names=['LanguageCrossEntropy'],
                      subset_num_batches=data.eval_max_batches or -1,
                      dataloader=build_domain_eval_loader(
                          source, data.eval_batch_size, domain=index, validate_hash=data.validate_hash,
                          download_retry=data.download_retry, download_timeout=data.download_timeout))
            for index, source in enumerate(manifest_sources(manifest, data.manifest, 'val', cache_root))]


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``: the config as flat hyperparameters for the trackers."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def main(argv: list[str] | None = None) -> Any:
    """Parse ``CONFIG.yaml [key=value ...]``, build everything and run ``Trainer.fit``; returns the trainer."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ('-h', '--help'):
        print(__doc__.strip().splitlines()[0], '\n\nSchema with defaults:\n', OmegaConf.to_yaml(TrainConfig), sep='')
        return None
    path = argv[0] if argv and not ('=' in argv[0] and not argv[0].endswith(('.yaml', '.yml'))) else None
    config = load_config(path, argv[1:] if path else argv)
    return train(config)


def train(config: DictConfig, callbacks: Sequence[Any] = ()) -> Any:
    """Build data, model, algorithm and Trainer from a validated config and fit; returns the trainer.

    ``callbacks`` are added to the trainer's own (per-domain eval summary, mixture monitor, lr).
    """
    import torch
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.callbacks import LRMonitor
    from composer.loggers import FileLogger
    from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
    from composer.utils import dist, get_device, reproducibility

    from composer_pike.algorithms import LossSlope, PiKE
    from composer_pike.callbacks import DomainEvalSummary, JsonlLogger, MixtureMonitor, RestoreRngState
    from composer_pike.data import MixtureDataset, build_mixture_dataloader, manifest_sources, read_manifest
    from composer_pike.policies import plan_policy

    device = config.trainer.device or ('gpu' if torch.cuda.is_available() else 'cpu')
    check_machine(config, device)
    trackers = build_loggers(config)
    reproducibility.seed_all(config.seed)
    # One process group before any StreamingDataset: otherwise each builds and tears down its own.
    dist.initialize_dist(get_device(device))
    os.makedirs(config.run_dir, exist_ok=True)
    cache_root = config.data.cache_root or os.path.join(config.run_dir, 'cache', f'node{dist.get_node_rank()}')
    manifest = read_manifest(config.data.manifest, cache_root, timeout=config.data.download_timeout,
                             retry=config.data.download_retry)
    tokenizer = manifest.get('tokenizer') or {}
    missing = [key for key in TOKENIZER_KEYS if key not in tokenizer]
    if missing:
        raise ConfigError(f"config key 'data.manifest': {config.data.manifest} records no tokenizer "
                          f"{', '.join(missing)} (pike-prep writes them)")
    mixing = config.mixing
    weights = OmegaConf.to_container(mixing.weights) if mixing.weights else None
    if weights:  # before any shard is read
        try:
            named_weights(weights, list(manifest['domains']))
        except ValueError as error:
            raise ConfigError(f"config key 'mixing.weights': {error}") from None
    dataset = MixtureDataset(manifest_sources(manifest, config.data.manifest, 'train', cache_root),
                             validate_hash=config.data.validate_hash, download_retry=config.data.download_retry,
                             download_timeout=config.data.download_timeout)
    plan = plan_policy(mixing.policy, dataset.domain_names, dataset.domain_sizes, weights=weights,
                       temperature=mixing.temperature, tau=mixing.tau)
    loader = build_mixture_dataloader(dataset, config.data.global_batch_size, weights=plan.weights,
                                      batching=plan.batching, on_exhausted=config.data.on_exhausted,
                                      seed=config.seed, steps_per_epoch=config.data.steps_per_epoch,
                                      num_workers=config.data.num_workers,
                                      prefetch_factor=config.data.prefetch_factor)
    model = build_model(config, tokenizer['vocab_size'], dataset.seq_len, tokenizer['eos_token_id'],
                        tokenizer['pad_token_id'])
    algorithms: list[Any] = []
    if plan.adaptive and plan.algorithm == 'loss_slope':
        algorithms.append(LossSlope(**loss_slope_options(mixing)))
    elif plan.adaptive:
        algorithms.append(PiKE(**pike_options(mixing)))
    if config.optimizer.clip_norm:
        algorithms.append(GradientClipping(clipping_type='norm', clipping_threshold=config.optimizer.clip_norm))
    optimizer = DecoupledAdamW(model.parameters(), lr=config.optimizer.lr, betas=tuple(config.optimizer.betas),
                               weight_decay=config.optimizer.weight_decay)
    scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=config.optimizer.warmup, alpha_f=config.optimizer.alpha_f)
    loggers = [FileLogger(os.path.join(config.run_dir, 'log-rank{rank}.txt')),
               JsonlLogger(config.trainer.log_file or os.path.join(config.run_dir, 'metrics.jsonl')), *trackers]
    trainer = Trainer(
        run_name=config.run_name,
        model=model,
        train_dataloader=loader,
        eval_dataloader=build_evaluators(config, manifest, cache_root),
        eval_interval=config.trainer.eval_interval,
        max_duration=config.trainer.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=[LRMonitor(), DomainEvalSummary(), MixtureMonitor(), *callbacks],
        loggers=loggers,
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
    if trainer._rng_state is not None and int(trainer.state.timestamp.batch_in_epoch) > 0:
        trainer.state.callbacks.append(RestoreRngState(trainer._rng_state))  # see RestoreRngState
        trainer._rng_state = None
    trainer.logger.log_hyperparameters({  # DTensor when FSDP2 really sharded the model
        **flatten(OmegaConf.to_container(config)), 'parameter_type': type(next(model.parameters())).__name__})
    try:
        trainer.fit()
    finally:  # flush loggers and finish checkpoint uploads, also when training fails
        trainer.close()
    return trainer


if __name__ == '__main__':
    try:
        main()
    except ConfigError as error:
        print(f'composer_pike.train: error: {error}', file=sys.stderr)
        sys.exit(2)
