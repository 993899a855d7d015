"""Pure-numpy mixture-weight math for PiKE, Balanced-PiKE and loss-slope mixing (float64, vectorised).

Section numbers refer to ``PIKE_MATH.md`` (Li et al., arXiv 2502.06244). Notation: ``G_k``
is the squared norm of domain k's full-batch gradient, ``sigma2_k`` the per-sample trace of
its gradient covariance (unit: one training sample = one packed sequence), ``b`` the
training batch size in samples, ``eta`` the learning rate, ``L`` the smoothness constant.
One concern a module:

* ``conceptual``: the descent bound's coefficients (s.3), its exact minimiser over the simplex
  (s.4, :func:`kkt_weights`) and one check of conceptual PiKE (:func:`kkt_update`).
* ``pike``: Algorithm 1 (s.5, s.6), ``log w_k += clip(zeta1*y_k*G_k - zeta2*sigma2_k/(2b))`` with
  ``y = 1`` for PiKE and ``y = K*softmax(tau*L_k)`` for Balanced-PiKE (:func:`pike_update`), and the
  full mirror-descent score for checking the ``gamma = 0`` reduction.
* ``evidence``: the evidence-driven update (s.9, PiKE's default): scores relative to the mixture's,
  shrunk by their standard errors (:func:`evidence_scores`), optionally with the alignment terms
  (:func:`alignment_terms`), ``zeta2/zeta1`` from the noise scale (:func:`auto_zeta_ratio`).
* ``elasticity``: loss-slope mixing's update from loss elasticities (:func:`elasticity_scores`).
* ``steps``: one check's log-space step shared by all of them (clip, renormalise, project onto the
  floor and cap; :func:`apply_scores`) and the default floor of one sample per batch
  (:func:`default_min_weight`).
* ``budget``: epoch caps from dataset sizes and largest-remainder apportionment of a batch into
  integer per-domain counts (s.8).

Nothing here imports torch or Composer: the algorithms import this package, never the reverse.
"""

from composer_pike.weights.budget import apportion, epoch_cap_upper_bounds
from composer_pike.weights.conceptual import descent_bound_coefficients, kkt_update, kkt_weights
from composer_pike.weights.elasticity import elasticity_scores
from composer_pike.weights.evidence import (EvidenceScores, alignment_terms, auto_zeta_ratio, evidence_scores,
                                            precision_shares)
from composer_pike.weights.pike import balanced_coefficients, mirror_descent_scores, pike_scores, pike_update
from composer_pike.weights.steps import PikeStep, apply_scores, default_min_weight, project_to_bounds

__all__ = ['EvidenceScores', 'PikeStep', 'alignment_terms', 'apply_scores', 'apportion', 'auto_zeta_ratio',
           'balanced_coefficients', 'default_min_weight', 'descent_bound_coefficients', 'elasticity_scores',
           'epoch_cap_upper_bounds', 'evidence_scores', 'kkt_update', 'kkt_weights', 'mirror_descent_scores',
           'pike_scores', 'pike_update', 'precision_shares', 'project_to_bounds']
