"""PiKE's conflict monitor: which pairs of domain gradients conflict beyond their errors.

PiKE assumes low gradient conflict. A probe's cosines are noisy (a few samples per chunk), so a
pair is reported only when its 95% interval lies wholly below the threshold, never on a low
point estimate alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CONFLICT_Z = 1.96  # a conflict needs the cosine's 95% interval below the threshold


def conflict_report(names: Sequence[str], cosines: np.ndarray, cosine_se: np.ndarray,
                    threshold: float) -> tuple[dict[str, float], list[str]]:
    """Metrics ``pike/cosine/<a>/<b>``, ``pike/cosine_se/<a>/<b>`` and ``pike/min_cosine``, and one
    message per pair whose interval ``cosine + 1.96 se`` lies below ``threshold``.

    ``cosines`` and ``cosine_se`` are (K, K) over ``names`` (NaN where a gradient norm is not
    positive: such pairs are logged, never reported, and left out of the minimum).
    """
    metrics: dict[str, float] = {}
    conflicts: list[str] = []
    lowest = math.inf
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b, cosine, se = names[j], float(cosines[i, j]), float(cosine_se[i, j])
            metrics[f'pike/cosine/{a}/{b}'] = cosine
            metrics[f'pike/cosine_se/{a}/{b}'] = se
            if math.isfinite(cosine):
                lowest = min(lowest, cosine)
            if cosine + CONFLICT_Z * se < threshold:
                conflicts.append(f"gradients of '{a}' and '{b}' conflict (cosine {cosine:.3f} +- "
                                 f'{CONFLICT_Z * se:.3f}, 95% interval below {threshold:.3f})')
    if math.isfinite(lowest):
        metrics['pike/min_cosine'] = lowest
    return metrics, conflicts
