"""Mixing policies behind one interface: PiKE, Balanced-PiKE, loss-slope mixing and the paper's static baselines.

A policy decides the loader's initial weights and batching method, and whether an algorithm
steers the weights during training. Selected by name (``mixing.policy`` in YAML).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

POLICIES = ('pike', 'balanced_pike', 'pike_kkt', 'loss_slope', 'balanced_loss_slope', 'mix', 'fixed', 'temperature',
            'random', 'round_robin')
# adaptive policy: (steering algorithm, tau (None: mixing.tau), PiKE update rule (None: mixing.pike.update))
ADAPTIVE = {'pike': ('pike', 0.0, None), 'balanced_pike': ('pike', None, None), 'pike_kkt': ('pike', 0.0, 'kkt'),
            'loss_slope': ('loss_slope', 0.0, None), 'balanced_loss_slope': ('loss_slope', None, None)}


@dataclass(frozen=True)
class PolicyPlan:
    """What a policy asks of the loader, and whether an algorithm steers the weights on top."""
    weights: np.ndarray
    batching: str
    adaptive: bool
    algorithm: str = 'pike'  # the steering algorithm when adaptive: 'pike' or 'loss_slope'
    tau: float = 0.0
    update: str | None = None  # the PiKE update rule the policy requires (None: mixing.pike.update)


def check_policy(name: str) -> None:
    """Fail with the closest valid name when ``name`` is not a policy."""
    if name not in POLICIES:
        close = difflib.get_close_matches(name, POLICIES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise ValueError(f"unknown mixing policy '{name}'{hint} (choose from {', '.join(POLICIES)})")


def temperature_weights(domain_sizes: Sequence[int], temperature: float) -> np.ndarray:
    """Size-proportional weights flattened by a temperature (mT5: w_k ~ n_k^(1/T)); T=1 is proportional."""
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    sizes = np.asarray(domain_sizes, dtype=np.float64)
    scaled = np.exp(np.log(sizes) / temperature - np.log(sizes).max() / temperature)
    return scaled / scaled.sum()


def named_weights(weights: Mapping[str, float] | Sequence[float], domain_names: Sequence[str]) -> np.ndarray:
    """Weights given as a list in domain order or as a {domain: weight} mapping (missing = 0), normalised."""
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(domain_names))
        if unknown:
            raise ValueError(f'weights name unknown domains {unknown}; the domains are {list(domain_names)}')
        vector = np.array([float(weights.get(name, 0.0)) for name in domain_names])
    else:
        vector = np.asarray(list(weights), dtype=np.float64)
        if vector.shape != (len(domain_names),):
            raise ValueError(f'weights has {vector.size} entries for {len(domain_names)} domains')
    if not np.all(np.isfinite(vector)) or np.any(vector < 0) or vector.sum() <= 0:
        raise ValueError(f'weights must be finite, non-negative and not all zero, got {vector.tolist()}')
    return vector / vector.sum()


def plan_policy(
    name: str,
    domain_names: Sequence[str],
    domain_sizes: Sequence[int],
    *,
    weights: Mapping[str, float] | Sequence[float] | None = None,
    temperature: float = 3.0,
    tau: float = 3.0,
) -> PolicyPlan:
    """Resolve a policy name to loader settings.

    ``weights`` are required for ``fixed`` and act as the prior (initial weights) for the adaptive
    policies (``ADAPTIVE``), ``random`` and ``mix`` (uniform when omitted).
    """
    check_policy(name)
    uniform = np.full(len(domain_names), 1.0 / len(domain_names))
    given = None if weights is None else named_weights(weights, domain_names)
    if name == 'fixed' and given is None:
        raise ValueError("mixing policy 'fixed' needs mixing.weights")
    initial: Any = given if given is not None else uniform
    if name == 'temperature':
        return PolicyPlan(temperature_weights(domain_sizes, temperature), 'mix', adaptive=False)
    if name == 'random':
        return PolicyPlan(initial, 'random', adaptive=False)
    if name == 'round_robin':
        return PolicyPlan(uniform, 'round_robin', adaptive=False)
    if name in ADAPTIVE:
        return replace(policy_adaptation(name, tau=tau), weights=initial)
    return PolicyPlan(initial, 'mix', adaptive=False)


def policy_adaptation(name: str, *, tau: float) -> PolicyPlan:
    """How an adaptive policy steers the weights (algorithm, Balanced tau, PiKE's update rule), with empty
    placeholder weights; ``adaptive=False`` for the static policies."""
    check_policy(name)
    if name not in ADAPTIVE:
        return PolicyPlan(np.empty(0), 'mix', adaptive=False)
    algorithm, fixed_tau, update = ADAPTIVE[name]
    return PolicyPlan(np.empty(0), 'mix', adaptive=True, algorithm=algorithm,
                      tau=tau if fixed_tau is None else fixed_tau, update=update)
