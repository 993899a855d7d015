"""Loss-slope mixing's update: log-weight increments from the domains' loss elasticities
``e_k = -dL_k / d log n_k``, toward ``w_k ~ y_k e_k`` and only as far as the evidence goes.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from composer_pike.weights._checks import (_active_mask, _non_finite_reason, _non_negative, _positive, _same_shape,
                                           _vector)
from composer_pike.weights.evidence import EvidenceScores, soft_threshold


def elasticity_scores(
    elasticities: ArrayLike,
    standard_errors: ArrayLike,
    weights: ArrayLike,
    *,
    step_size: float,
    evidence_z: float,
    loss_weights: ArrayLike | None = None,
    active: ArrayLike | None = None,
) -> EvidenceScores:
    """Log-weight increments from loss elasticities ``e_k = -dL_k / d log n_k`` (nats per e-fold of samples).

    With ``n_k = w_k T``, the marginal value of weight is ``-d(sum_j y_j L_j)/dw_k = y_k e_k / w_k``
    (``y = 1``: the average loss; Balanced-PiKE's ``y``: the tilted one); the mixture's mean of it is
    ``S = sum_j y_j e_j``, and the weights are optimal when every domain's value equals ``S``
    (``w_k ~ y_k e_k``). Each domain's advantage ``a_k = y_k e_k / (w_k S) - 1`` (standard error
    ``y_k se_k / (w_k S)``) is shrunk toward 0 by ``evidence_z`` standard errors and taken as
    ``step_size * shrunk_k`` nats: weights move while the evidence says a domain is worth more or less
    than its share, and stay put where it does not (a domain at the floor, measured on few samples,
    is not pushed back up by its own noise). No update (``reason`` set) without finite elasticities or
    with ``S`` not positive.
    """
    values = _vector("elasticities", elasticities)
    errors = _vector("standard_errors", standard_errors)
    mix = _vector("weights", weights)
    _same_shape("elasticities", values, standard_errors=errors, weights=mix)
    num_domains = values.size
    mask = _active_mask(active, num_domains)
    coefficients = np.ones(num_domains) if loss_weights is None else _vector("loss_weights", loss_weights)
    _same_shape("elasticities", values, loss_weights=coefficients)
    step_size = _positive("step_size", step_size)
    evidence_z = _non_negative("evidence_z", evidence_z)
    zeros = np.zeros(num_domains)
    reason = _non_finite_reason(mask, {"elasticities": values, "standard_errors": errors, "loss_weights": coefficients})
    if reason:  # an elasticity is NaN until its domain has two bins in its window
        return EvidenceScores(zeros, zeros, zeros, evidence_z, reason)
    if not (mix[mask] > 0).all():
        raise ValueError(f"weights must be > 0 on the active domains, got {mix[mask].tolist()}")
    signal = float(np.sum(np.where(mask, coefficients * values, 0.0)))
    if not signal > 0:
        return EvidenceScores(zeros, zeros, zeros, evidence_z,
                              f"the domains' summed loss elasticity {signal:.3g} is not positive")
    share = np.where(mask, mix, 1.0) * signal
    advantage = np.where(mask, coefficients * values / share - 1.0, 0.0)
    advantage_se = np.where(mask, coefficients * errors / share, 0.0)
    shrunk = soft_threshold(advantage, advantage_se, evidence_z)
    return EvidenceScores(step_size * shrunk, advantage, advantage_se, evidence_z, "")
