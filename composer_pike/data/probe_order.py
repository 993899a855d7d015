"""Per-domain probe orders for the PiKE gradient probe, in memory that does not grow with the domain.

The probe of domain k reads the domain in an order of its own, independent of training: pass 0 is
a pseudo-random permutation of the domain's sample indices [0, N_k), pass 1 another one, and so
on. Pass p permutes with round keys derived from (seed, k, p), so the order is a function of the
seed, the domain and the position in it only: the same on every rank and for any amount of
training, and no sample repeats within a pass.

A pass is never materialised (domains can hold 10^8 samples): sample ``i`` of a pass is the image
of ``i`` under a keyed Feistel network on [0, 2^n), the next power of two >= N_k (n >= 2),
restricted to [0, N_k) by cycle-walking (apply the network again while the image is >= N_k),
which keeps it a bijection. The network is vectorised over numpy arrays; walks stay short because
fewer than half of [0, 2^n) lies outside [0, N_k) (for N_k > 2).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

FEISTEL_ROUNDS = 6  # an even count, so the output's half widths are the input's
PROBE_STREAM = 0x5052_4F42  # 'PROB': keeps probe keys apart from the planner's shuffle seeds


def pass_keys(seed: int, domain: int, pass_index: int) -> np.ndarray:
    """The Feistel round keys (uint64) of ``domain``'s pass ``pass_index`` under ``seed``."""
    sequence = np.random.SeedSequence([seed, domain, pass_index, PROBE_STREAM])
    return sequence.generate_state(FEISTEL_ROUNDS, dtype=np.uint64)


def _round_function(half: np.ndarray, key: np.uint64, bits: int) -> np.ndarray:
    """Keyed hash of ``half`` to ``bits`` bits (the splitmix64 finaliser of ``half ^ key``)."""
    h = half ^ key
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
    h ^= h >> np.uint64(31)
    return h & np.uint64((1 << bits) - 1)


def _feistel(values: np.ndarray, bits: int, keys: np.ndarray) -> np.ndarray:
    """A keyed bijection of [0, 2^bits) applied to ``values`` (uint64).

    Unbalanced halves when ``bits`` is odd: each round maps (left, right) to
    (right, left ^ F(right)) and the two widths swap, which is invertible for any widths.
    """
    left_bits, right_bits = bits // 2, bits - bits // 2
    left, right = values >> np.uint64(right_bits), values & np.uint64((1 << right_bits) - 1)
    for key in keys:
        left, right = right, left ^ _round_function(right, key, left_bits)
        left_bits, right_bits = right_bits, left_bits
    return (left << np.uint64(right_bits)) | right


def permute(positions: np.ndarray, size: int, keys: np.ndarray) -> np.ndarray:
    """Images of ``positions`` (in [0, size)) under the keyed permutation of [0, size); int64.

    Memory and time are proportional to ``len(positions)``, not to ``size``.
    """
    bits = max(2, (int(size) - 1).bit_length())
    images = _feistel(np.asarray(positions, dtype=np.uint64), bits, keys)
    outside = np.flatnonzero(images >= size)
    while outside.size:  # cycle-walk: every walk ends inside, at a different sample
        images[outside] = _feistel(images[outside], bits, keys)
        outside = outside[images[outside] >= size]
    return images.astype(np.int64)


class ProbeOrder:
    """A cursor into each domain's probe order (see the module docstring).

    Args:
        domain_sizes: samples per domain.
        seed: the loader's seed (the planner's); with the domain and the pass it keys every permutation.
    """

    def __init__(self, domain_sizes: Sequence[int] | np.ndarray, seed: int) -> None:
        self.domain_sizes = [int(n) for n in domain_sizes]
        if any(n < 1 for n in self.domain_sizes):
            raise ValueError(f'every domain needs at least one sample, got sizes {self.domain_sizes}')
        self.seed = int(seed)
        self.passes = [0] * len(self.domain_sizes)  # the pass each domain's cursor is in
        self.cursors = [0] * len(self.domain_sizes)  # samples of that pass already taken

    def take(self, domain: int, count: int) -> np.ndarray:
        """The next ``count`` sample indices of ``domain``'s probe order; advances its cursor.

        At the end of a pass the rest of the pass comes first, then the start of the next pass's
        permutation (``count`` may span several passes of a small domain).
        """
        if count < 0:
            raise ValueError(f'cannot take {count} probe samples')
        size = self.domain_sizes[domain]
        parts = []
        while count > 0:
            start = self.cursors[domain]
            got = min(count, size - start)
            keys = pass_keys(self.seed, domain, self.passes[domain])
            parts.append(permute(np.arange(start, start + got), size, keys))
            count -= got
            self.cursors[domain] += got
            if self.cursors[domain] == size:
                self.passes[domain] += 1
                self.cursors[domain] = 0
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        """Per-domain passes and cursors (primitives only)."""
        return {'passes': list(self.passes), 'cursors': list(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the domains must be the same."""
        passes, cursors = [int(p) for p in state['passes']], [int(c) for c in state['cursors']]
        if not len(passes) == len(cursors) == len(self.domain_sizes):
            raise ValueError(f'probe order state has {len(passes)} passes and {len(cursors)} cursors, '
                             f'this mixture has {len(self.domain_sizes)} domains')
        for k, (p, c) in enumerate(zip(passes, cursors)):
            if p < 0 or not 0 <= c < self.domain_sizes[k]:
                raise ValueError(f'domain {k}: probe pass {p}, cursor {c} outside a domain of '
                                 f'{self.domain_sizes[k]} samples')
        self.passes, self.cursors = passes, cursors
