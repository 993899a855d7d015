"""The Composer algorithms that steer the mixture loader's weights during training, one a module:
``pike`` (:class:`PiKE`, from per-domain gradient statistics of a probe) and ``loss_slope``
(:class:`LossSlope`, from the loss elasticities of the training batches); ``common`` holds what they
share. They import the math (:mod:`composer_pike.weights`, :mod:`composer_pike.stats`), never the reverse."""
from composer_pike.algorithms.loss_slope import LossSlope
from composer_pike.algorithms.pike import PiKE

__all__ = ['LossSlope', 'PiKE']
