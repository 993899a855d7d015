"""Small Composer callbacks and a logger destination used by the training entry point."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from composer_pike.algorithms.common import find_mixture


class DomainEvalSummary(Callback):
    """After all evaluators ran, log the average and the worst held-out loss over ``val_<domain>`` evaluators.

    Metrics: ``eval/avg_loss``, ``eval/worst_loss`` (cross-entropy, nats per token).
    """

    def eval_after_all(self, state: State, logger: Logger) -> None:
        losses = [float(metrics['LanguageCrossEntropy'].compute())
                  for label, metrics in state.eval_metrics.items()
                  if label.startswith('val_') and 'LanguageCrossEntropy' in metrics]
        if losses:
            logger.log_metrics({'eval/avg_loss': sum(losses) / len(losses), 'eval/worst_loss': max(losses)})


class JsonlLogger(LoggerDestination):
    """Appends every logged metric as a JSON line ``{"step": batch, "<name>": value}``.

    Rank 0 only, unless ``path`` contains ``{rank}``: then every rank writes its own file. Appending
    means an autoresumed run continues the same file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Optional[Any] = None

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        per_rank = '{rank}' in self.path
        if not per_rank and dist.get_global_rank() != 0:
            return
        if self._file is None:
            path = self.path.replace('{rank}', str(dist.get_global_rank()))
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, 'a')
        values = {name: float(value) for name, value in metrics.items() if _is_number(value)}
        if values:
            self._file.write(json.dumps({'step': step, **values}) + '\n')
            self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


class MixtureMonitor(Callback):
    """Logs the mixture loader's state for any policy.

    Every ``interval`` batches: ``mixture/weight/<domain>`` and ``mixture/batch_count/<domain>`` (in
    force for the next batch) and ``mixture/epochs/<domain>`` (passes over the domain so far). (An
    ``on_exhausted='stop'`` mixture stops its Trainer itself: see :class:`MixtureDataLoader`.)
    """

    def __init__(self, interval: int = 10) -> None:
        self.interval = interval

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step % self.interval == 0 or step == 1:
            mixture = find_mixture(state, 'MixtureMonitor')
            weights, counts, epochs = mixture.weights_at(step), mixture.counts_at(step), mixture.domain_epochs()
            metrics = {}
            for k, name in enumerate(mixture.domain_names):
                metrics[f'mixture/weight/{name}'] = float(weights[k])
                metrics[f'mixture/batch_count/{name}'] = float(counts[k])
                metrics[f'mixture/epochs/{name}'] = float(epochs[k])
            logger.log_metrics(metrics)


class RestoreRngState(Callback):
    """Restores a checkpoint's RNG states right after the first resumed batch is drawn.

    Composer 0.32 restores them only at an epoch start or while replaying (spinning) the loader; a
    loader that resumes itself mid-epoch (the mixture loader) would otherwise go on with fresh RNG
    streams (other dropout masks), and a resumed run would drift from the uninterrupted one. In that
    run the RNG states at this point are the ones saved with the checkpoint.
    """

    def __init__(self, rng_state: list[dict[str, Any]]) -> None:
        self.rng_state: Optional[list[dict[str, Any]]] = rng_state

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.rng_state is not None:
            from composer.utils import reproducibility
            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None
