"""Per-domain gradient statistics for PiKE: the sharded accumulator that reads chunk gradients
(:mod:`.accumulator`), the estimators and their sampling errors (:mod:`.estimators`), and their pooling
across checks (:mod:`.pooling`). Imports run one way: accumulator and pooling use estimators.
Per-domain training-loss trends for loss-slope mixing (:mod:`.loss_trend`) stand alone."""
from composer_pike.stats.accumulator import (
    LAYOUTS,
    GradientStatistics,
    GradientStatsAccumulator,
    gradient_layout,
    gradient_replicas,
    gradient_sum_factor,
    local_gradient,
)
from composer_pike.stats.estimators import (
    cosine_intervals,
    estimate_from_sums,
    estimator_variances,
    inner_product_variances,
    noise_shape_evidence,
    pairwise_cosines,
)
from composer_pike.stats.loss_trend import LossTrend, mean_log_samples
from composer_pike.stats.pooling import PooledStatistics

__all__ = [
    'LAYOUTS', 'GradientStatistics', 'GradientStatsAccumulator', 'LossTrend', 'PooledStatistics', 'cosine_intervals',
    'estimate_from_sums', 'estimator_variances', 'gradient_layout', 'gradient_replicas',
    'gradient_sum_factor', 'inner_product_variances',
    'local_gradient', 'mean_log_samples', 'noise_shape_evidence', 'pairwise_cosines',
]
