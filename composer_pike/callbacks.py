"""Small Composer callbacks and a logger destination used by the training entry point."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist


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
    """Appends every logged metric as a JSON line ``{"step": batch, "<name>": value}`` (rank 0 only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Optional[Any] = None

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if dist.get_global_rank() != 0:
            return
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, 'a')
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
