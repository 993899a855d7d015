"""Per-domain gradient statistics for PiKE: the sharded accumulator that reads chunk gradients
(:mod:`.accumulator`), the estimators and their sampling errors (:mod:`.estimators`), and their pooling
across checks (:mod:`.pooling`). Imports run one way: accumulator and pooling use estimators."""
from composer_pike.stats.accumulator import (
    LAYOUTS,
    GradientStatistics,
    GradientStatsAccumulator,
    gradient_layout,
    gradient_sum_factor,
    local_gradient,
)
from composer_pike.stats.estimators import (
    cosine_intervals,
    estimate_from_sums,
    estimator_variances,
    noise_shape_evidence,
    pairwise_cosines,
)
from composer_pike.stats.pooling import PooledStatistics

__all__ = [
    'LAYOUTS', 'GradientStatistics', 'GradientStatsAccumulator', 'PooledStatistics', 'cosine_intervals',
    'estimate_from_sums', 'estimator_variances', 'gradient_layout', 'gradient_sum_factor', 'local_gradient',
    'noise_shape_evidence', 'pairwise_cosines',
]
