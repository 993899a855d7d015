"""Loss-slope mixing: a Composer algorithm that weights each domain by how much its loss still falls
per e-fold of its own training samples, read off the training batches themselves (no probe).

At AFTER_LOSS (once per microbatch) it scores every training sample's mean next-token loss from the
model's logits, without gradients, and adds it to its domain's sums for the current interval. Every
``check_interval`` steps, at BATCH_END, the interval's sums (over ranks) become one bin of a
:class:`composer_pike.stats.LossTrend`, which fits each domain's elasticity ``e_k``. The weights head
for ``w_k ~ e_k``, the optimum of ``sum_k L_k`` when each loss falls linearly in the log of its own
samples: each check, a domain whose elasticity per unit of weight differs from the mixture's by more
than ``evidence_z`` standard errors moves (:func:`composer_pike.weights.elasticity_scores`), within
the floor and cap. The training forward pass is the only forward pass: the algorithm costs one
cross-entropy over the logits per microbatch.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from composer_pike.algorithms.common import check_step_options, find_mixture, weight_cap, weight_floor
from composer_pike.data import MixtureDataset
from composer_pike.stats import LossTrend
from composer_pike.weights import apply_scores, balanced_coefficients, elasticity_scores

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # label of tokens that carry no loss (Hugging Face and llm-foundry convention)


def per_sample_losses(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's mean next-token cross-entropy (nats) from the model's logits, float32, no graph.

    ``outputs`` holds the logits (a tensor, ``.logits`` or ``['logits']``, shape ``(B, S, V)``) and
    ``batch['labels']`` is aligned with ``input_ids``: position ``i`` predicts label ``i + 1``, labels
    ``-100`` carry no loss. One row at a time, so the float32 copy is ``S x V``, not ``B x S x V``.
    """
    logits = outputs if isinstance(outputs, torch.Tensor) else (
        outputs['logits'] if isinstance(outputs, Mapping) else getattr(outputs, 'logits', None))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError('loss-slope mixing needs the model outputs to carry logits of shape (batch, seq, vocab); '
                        f'got {type(outputs).__name__}')
    if 'labels' not in batch:
        raise KeyError("loss-slope mixing needs batch['labels'] (next-token targets aligned with input_ids)")
    targets = batch['labels'][:, 1:]
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for row in range(logits.shape[0]):
            token_losses = F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=IGNORE_INDEX,
                                           reduction='sum')
            losses[row] = token_losses / (targets[row] != IGNORE_INDEX).sum().clamp(min=1)
    return losses


class LossSlope(Algorithm):
    """Mix domains in proportion to their loss elasticities, measured on the training batches.

    Args:
        check_interval: optimizer steps per bin and between weight updates.
        window: fit each domain's elasticity over its last ``window``-fold of samples (2: the bins
            since it had half the samples it has now), so that early transients (a domain of random
            characters learns its alphabet, then has nothing left to learn) leave the fit.
        step_size: nats of log-weight per check for a domain whose elasticity per unit of weight is
            twice the mixture's (see :func:`composer_pike.weights.elasticity_scores`).
        evidence_z: standard errors by which a domain's elasticity per unit of weight must differ
            from the mixture's before its weight moves.
        score_clip: most nats a log-weight moves per check.
        min_weight: floor on every active weight (default ``max(0.05/K, 1/b)``: one sample of every
            domain per batch).
        max_weight: cap on every weight.
        tau: Balanced-PiKE's temperature (0: the average loss; > 0 weights each domain's loss by
            ``K softmax(tau L)`` of the latest training losses).
        max_epochs_per_domain: optional cap on passes over each domain (as :class:`composer_pike.PiKE`).
    """

    def __init__(self, check_interval: int = 100, window: float = 2.0, step_size: float = 0.5, evidence_z: float = 2.5,
                 score_clip: float = 1.0, min_weight: float | None = None, max_weight: float = 1.0,
                 tau: float = 0.0, max_epochs_per_domain: float | None = None) -> None:
        if check_interval < 1:
            raise ValueError(f'check_interval must be >= 1, got {check_interval}')
        if not window > 1:
            raise ValueError(f'window must be > 1, got {window}')
        check_step_options(step_size=step_size, evidence_z=evidence_z, score_clip=score_clip, tau=tau,
                           max_epochs_per_domain=max_epochs_per_domain)
        self.check_interval = check_interval
        self.window = window
        self.step_size = step_size
        self.evidence_z = evidence_z
        self.score_clip = score_clip
        self.min_weight = min_weight
        self.max_weight = max_weight
        self.tau = tau
        self.max_epochs_per_domain = max_epochs_per_domain
        self.checks = 0
        self.mixture: MixtureDataset | None = None
        self.trend: LossTrend | None = None
        self._step: torch.Tensor | None = None  # (3, K): this step's loss sums, squares and counts on this rank
        self._interval: torch.Tensor | None = None  # (3, K): the interval's sums so far, over ranks
        self._loaded: dict[str, Any] | None = None
        self._repeating: set[str] = set()  # domains already warned about a second pass

    def match(self, event: Event, state: State) -> bool:
        if event == Event.FIT_START:
            return True
        if self.trend is None:
            return False
        return event in (Event.BEFORE_TRAIN_BATCH, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._attach(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            # Fired again when Composer retries the batch after a CUDA OOM (automatic microbatching):
            # the microbatches scored before the failure are scored again, so the step starts over.
            self._step.zero_()
        elif event == Event.AFTER_LOSS:
            self._score_microbatch(state)
        else:
            self._close_step()
            if int(state.timestamp.batch) % self.check_interval == 0:
                self._update(state, logger)

    def state_dict(self) -> dict[str, Any]:
        # One JSON string, as PiKE's: sharded checkpoints load only into entries that exist before the load.
        # The open interval's sums travel too, so a checkpoint between checks loses none of its samples.
        trend = None if self.trend is None else {**self.trend.state_dict(), 'interval': self._interval.tolist()}
        return {'checks': int(self.checks), 'trend': json.dumps(trend)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checks = int(state['checks'])
        self._loaded = json.loads(state['trend'])
        self._restore()

    # ---- steps -------------------------------------------------------------------------------

    def _attach(self, state: State) -> None:
        self.mixture = find_mixture(state, 'loss-slope mixing')
        if self.mixture.num_domains < 2:
            log.warning('loss-slope mixing has nothing to mix: the loader has one domain (%s)',
                        self.mixture.domain_names[0])
            return
        self.trend = LossTrend(self.mixture.num_domains)
        self._step = torch.zeros(3, self.mixture.num_domains, dtype=torch.float64, device=state.device._device)
        self._interval = torch.zeros_like(self._step)
        self._restore()

    def _restore(self) -> None:
        if self._loaded is not None and self.trend is not None:
            self.trend.load_state_dict(self._loaded)
            self._interval.copy_(torch.tensor(self._loaded['interval'], dtype=torch.float64))
            self._loaded = None

    def _score_microbatch(self, state: State) -> None:
        assert self._step is not None
        losses = per_sample_losses(state.outputs, state.batch).double()
        domains = state.batch['domain'].to(losses.device)
        self._step[0].index_add_(0, domains, losses)
        self._step[1].index_add_(0, domains, losses * losses)
        self._step[2].index_add_(0, domains, torch.ones_like(losses))

    def _close_step(self) -> None:
        """Add this step's sums over ranks to the interval's (3 K numbers: one small all-reduce a step, no
        host sync), so that every rank holds the whole interval whenever a checkpoint is written."""
        assert self._step is not None and self._interval is not None
        dist.all_reduce(self._step)
        self._interval += self._step

    def _update(self, state: State, logger: Logger) -> None:
        mixture, trend = self.mixture, self.trend
        assert mixture is not None and trend is not None and self._interval is not None
        trend.add_bin(*self._interval.cpu().numpy())
        self._interval.zero_()
        self.checks += 1
        mask = mixture.planner.active
        floor = weight_floor(mixture, mask, self.min_weight)
        cap = weight_cap(state, mixture, self.max_weight, self.max_epochs_per_domain)
        elasticities, errors, bins = trend.elasticities(self.window)
        seen = trend.samples_seen
        latest = trend.latest_losses()
        coefficients = None
        if self.tau > 0 and np.isfinite(latest[mask]).all():
            coefficients = balanced_coefficients(np.where(mask, latest, 0.0), self.tau, active=mask)
        with np.errstate(divide='ignore'):
            current = np.log(mixture.latest_weights()[1])
        evidence = elasticity_scores(elasticities, errors, np.exp(current), step_size=self.step_size,
                                     evidence_z=self.evidence_z, loss_weights=coefficients, active=mask)
        result = apply_scores(current, evidence.scores, active=mask, score_clip=self.score_clip, min_weight=floor,
                              max_weight=cap, reason=evidence.reason)
        after_step = int(state.timestamp.batch) - 1
        if result.skipped:
            log.info('loss-slope mixing: no update after batch %d: %s', after_step, result.reason)
        else:
            mixture.set_weights(result.weights, after_step=after_step)
        self._warn_on_repeats(mixture)
        metrics = {'loss_slope/skipped': float(result.skipped), 'loss_slope/checks': float(self.checks)}
        for k, name in enumerate(mixture.domain_names):
            metrics[f'loss_slope/weight/{name}'] = float(result.weights[k])
            metrics[f'loss_slope/train_loss/{name}'] = float(latest[k])
            metrics[f'loss_slope/bins/{name}'] = float(bins[k])
            metrics[f'loss_slope/samples/{name}'] = float(seen[k])
            if coefficients is not None:
                metrics[f'loss_slope/loss_weight/{name}'] = float(coefficients[k])
            if np.isfinite(elasticities[k]):
                metrics[f'loss_slope/elasticity/{name}'] = float(elasticities[k])
                metrics[f'loss_slope/elasticity_se/{name}'] = float(errors[k])
                metrics[f'loss_slope/advantage/{name}'] = float(evidence.advantage[k])
                metrics[f'loss_slope/advantage_se/{name}'] = float(evidence.advantage_se[k])
        logger.log_metrics(metrics)

    def _warn_on_repeats(self, mixture: MixtureDataset) -> None:
        """Once per domain: past its first pass, a domain's training losses include samples the model
        has trained on, so they fall faster than its held-out loss and its elasticity reads high."""
        for name, epochs in zip(mixture.domain_names, mixture.domain_epochs()):
            if epochs > 1 and name not in self._repeating:
                self._repeating.add(name)
                log.warning("loss-slope mixing: domain '%s' is past its first pass (%.2f epochs); its training "
                            'losses now include repeated samples and overstate what it has left to teach '
                            '(max_epochs_per_domain caps its passes)', name, epochs)
