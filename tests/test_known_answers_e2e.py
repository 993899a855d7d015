"""Known-answer mixtures end to end: real corpora through ``pike-prep``, real training through
``python -m composer_pike.train`` with the shipped defaults of both adaptive policies, PiKE and
loss-slope mixing (the counterpart of the simulated :mod:`test_known_answers` and the simulations
in :mod:`test_loss_slope`).

The model, optimizer, batch and check sizes (check_interval, estimation_batch_size, num_chunks) are
``yamls/demo_cpu.yaml``'s; no other ``mixing.pike`` or ``mixing.loss_slope`` key is set. Runs are shortened to ``STEPS`` steps
(at least 11 checks) and held-out evaluation is reduced to one batch at the end.

Two environment variables repeat the runs for a study, never in CI: ``PIKE_E2E_SEED`` sets the
training seed (model, data order and probe order; default the yaml's), and ``PIKE_E2E_OVERRIDES``
adds space-separated ``key=value`` overrides (e.g. ``mixing.pike.alignment=true``) to test a
candidate rule on the same known answers. Each run prints them.

Corpora are :mod:`streaming_prep.known_answers`' (``python -m streaming_prep.known_answers KIND``), built
from Python's own standard-library source, files assigned to domains by a seeded random draw:

- null: one corpus split at random into 4 domains; every weight must stay within ``NULL_BOUND``
  nats of 1/4 at every check.
- planted: three random thirds of the stdlib plus one domain of uniformly random printable
  characters (nothing to learn beyond the unigram distribution); it must end at (at most twice) the
  weight floor and be the lowest weight from some check on. PiKE does not meet it (an expected failure, see
  ``PIKE_KEEPS_RANDOM_CHARACTERS``); loss-slope mixing does.
- duplicates: one stdlib domain whose shards are written twice under two names, beside C headers
  and pydoc topics; the two copies' final weights must agree within ``DUPLICATE_BOUND`` nats.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_known_answers import DUPLICATE_BOUND, NULL_BOUND, log_spread

from composer_pike.demo import read_metrics, run_training
from composer_pike.weights import default_min_weight
from streaming_prep.known_answers import build_corpus

# Each test trains 300 steps (about 1.5 min idle); under load one took 845 s, near pytest's 900 s default.
pytestmark = pytest.mark.timeout(3600)
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / 'yamls' / 'demo_cpu.yaml'
DEMO = OmegaConf.load(CONFIG)
BATCH = int(DEMO.data.global_batch_size)
CHECK_INTERVAL = int(DEMO.mixing.pike.check_interval)
SEQ_LEN = 128  # the demo corpus's (composer_pike.demo --seq-len default)
STEPS = 300
POLICIES = ('pike', 'loss_slope')  # the adaptive policies; each logs <policy>/weight/<domain> at every check
MIN_CHECKS = 11  # PiKE's, before batches 25, 50, ..., 275 (loss-slope's: after 25, ..., 300)
SEED_OVERRIDE = [f'seed={os.environ["PIKE_E2E_SEED"]}'] if os.environ.get('PIKE_E2E_SEED') else []
STUDY_OVERRIDES = SEED_OVERRIDE + os.environ.get('PIKE_E2E_OVERRIDES', '').split()  # checked by the yaml schema


# ----------------------------------------------------------------------------------------- corpora


@pytest.fixture(scope='module')
def null_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('null') / 'data'
    build_corpus('null', out, seq_len=SEQ_LEN)
    return out


@pytest.fixture(scope='module')
def planted_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('planted') / 'data'
    build_corpus('planted', out, seq_len=SEQ_LEN)
    return out


@pytest.fixture(scope='module')
def duplicate_corpus(tmp_path_factory) -> Path:
    """copy_a and copy_b: the same shards (copy_a's directory copied), beside C headers and pydoc topics."""
    out = tmp_path_factory.mktemp('duplicate') / 'data'
    build_corpus('duplicates', out, seq_len=SEQ_LEN)
    return out


# ---------------------------------------------------------------------------------------- training


def train(manifest: Path, run_dir: Path, name: str, policy: str) -> dict[str, list[tuple[int, float]]]:
    """The demo's model and ``policy``'s defaults for STEPS steps; the run's metrics.jsonl as series."""
    overrides = [f'data.manifest={manifest}', f'mixing.policy={policy}', f'run_name=known-answer-{name}',
                 f'trainer.max_duration={STEPS}ba', f'trainer.eval_interval={100 * STEPS}ba',
                 'data.eval_max_batches=1', *STUDY_OVERRIDES]
    start = time.monotonic()
    run_training(str(CONFIG), str(run_dir), overrides, echo=False)
    print(f'[{name}] trained {STEPS} steps in {time.monotonic() - start:.0f} s'
          f'{" with " + " ".join(STUDY_OVERRIDES) if STUDY_OVERRIDES else ""}')
    return read_metrics(str(run_dir / 'metrics.jsonl'))


def weight_history(series: dict, domains: list[str], policy: str) -> tuple[list[int], np.ndarray]:
    """(steps, weights[check, domain]) of the logged ``<policy>/weight/<d>``."""
    steps = [step for step, _ in series[f'{policy}/weight/{domains[0]}']]
    for d in domains:
        assert [step for step, _ in series[f'{policy}/weight/{d}']] == steps, d
    weights = np.array([[value for _, value in series[f'{policy}/weight/{d}']] for d in domains]).T
    assert len(steps) >= MIN_CHECKS, f'only {len(steps)} checks logged'
    return steps, weights


REPORTED = {'pike': ('advantage', 'advantage_se', 'noise_scale', 'score', 'pooled/grad_sq_norm', 'probe_loss'),
            'loss_slope': ('advantage', 'advantage_se', 'elasticity', 'elasticity_se', 'train_loss', 'bins')}


def report(name: str, policy: str, series: dict, domains: list[str], steps: list[int], weights: np.ndarray) -> None:
    """Weights per check, then the last check's statistics per domain."""
    skipped = [step for step, value in series.get(f'{policy}/skipped', []) if value]
    print(f'[{name}] {policy} weights per check (skipped checks: {skipped or "none"})')
    print('  step  ' + ' '.join(f'{d:>13}' for d in domains))
    for step, row in zip(steps, weights):
        print(f'  {step:4d}  ' + ' '.join(f'{w:13.4f}' for w in row))
    print(f'[{name}] last check (step {steps[-1]}):')
    for key in ('zeta_ratio', 'critical_z'):
        if f'{policy}/{key}' in series:
            print(f'  {policy}/{key} = {series[f"{policy}/{key}"][-1][1]:.4g}')
    print(f'  {"domain":>13} ' + ' '.join(f'{metric:>13}' for metric in REPORTED[policy]))
    for d in domains:
        def last(metric: str) -> float:
            values = series.get(f'{policy}/{metric}/{d}')
            return values[-1][1] if values else float('nan')
        print(f'  {d:>13} ' + ' '.join(f'{last(metric):13.4g}' for metric in REPORTED[policy]))


def domain_names(manifest: Path) -> list[str]:
    return list(json.loads((manifest / 'manifest.json').read_text())['domains'])


# ------------------------------------------------------------------------------------------- tests


def test_setup_has_enough_checks():
    assert len(range(CHECK_INTERVAL, STEPS, CHECK_INTERVAL)) >= MIN_CHECKS
    assert DEMO.mixing.loss_slope.check_interval == CHECK_INTERVAL


@pytest.mark.parametrize('policy', POLICIES)
def test_null_mixture_keeps_uniform_weights(null_corpus, tmp_path, policy):
    """One corpus split at random into 4 domains: every weight within NULL_BOUND nats of 1/4 at every check."""
    domains = domain_names(null_corpus)
    series = train(null_corpus, tmp_path / 'run', 'null', policy)
    steps, weights = weight_history(series, domains, policy)
    report('null', policy, series, domains, steps, weights)
    deviation = np.abs(np.log(len(domains) * weights))
    worst = np.unravel_index(np.argmax(deviation), deviation.shape)
    print(f'[null {policy}] max |log(4 w)| = {deviation.max():.4f} nats (domain {domains[worst[1]]} at step '
          f'{steps[worst[0]]}; bound {NULL_BOUND}); final log spread {log_spread(weights[-1]):.4f}')
    assert deviation.max() <= NULL_BOUND


# Not met by PiKE (README "How the weights follow the statistics"): random characters' own G is as large as the
# text's once they have learned their alphabet; only the alignment terms (their gradient lowers no other domain's
# loss) sink them, by 0.03-0.27 nats a check, and 300 steps are too few to reach twice the floor (2.7-4.4x on
# three training seeds). Strict, so that a rule that does pass makes the suite fail until this mark goes.
PIKE_KEEPS_RANDOM_CHARACTERS = pytest.mark.xfail(
    strict=True, reason="PiKE's own G rates random characters like the text (their loss is flat, their gradient "
                        "is not); the alignment terms sink them, but too slowly for 300 steps")


@pytest.mark.parametrize('policy', [pytest.param('pike', marks=PIKE_KEEPS_RANDOM_CHARACTERS), 'loss_slope'])
def test_random_characters_sink_to_the_floor(planted_corpus, tmp_path, policy):
    """Three random thirds of the stdlib and uniformly random characters: the random domain ends at (at
    most twice) the floor and is the lowest weight from some check on."""
    domains = domain_names(planted_corpus)
    sunk = domains.index('random_chars')
    series = train(planted_corpus, tmp_path / 'run', 'planted', policy)
    steps, weights = weight_history(series, domains, policy)
    report('planted', policy, series, domains, steps, weights)
    floor = default_min_weight(len(domains), BATCH)
    others = np.delete(weights, sunk, axis=1)
    lowest = weights[:, sunk] <= others.min(axis=1)
    since = next((c for c in range(len(steps)) if lowest[c:].all()), None)
    print(f'[planted {policy}] random_chars trajectory: {" ".join(f"{w:.4f}" for w in weights[:, sunk])}')
    print(f'[planted {policy}] floor {floor:.5f}; final {weights[-1, sunk]:.5f} ({weights[-1, sunk] / floor:.2f} x floor); '
          f'lowest from check {since} (step {steps[since] if since is not None else None}) on; '
          f'log spread of the three thirds at the end {log_spread(others[-1]):.4f}')
    assert weights[-1, sunk] <= 2 * floor
    assert since is not None


@pytest.mark.parametrize('policy', POLICIES)
def test_duplicated_domain_copies_share_weight(duplicate_corpus, tmp_path, policy):
    """Identical shards under two names beside two other domains: the copies end within DUPLICATE_BOUND nats."""
    domains = domain_names(duplicate_corpus)
    a, b = domains.index('copy_a'), domains.index('copy_b')
    series = train(duplicate_corpus, tmp_path / 'run', 'duplicates', policy)
    steps, weights = weight_history(series, domains, policy)
    report('duplicates', policy, series, domains, steps, weights)
    ratios = np.log(weights[:, a] / weights[:, b])
    print(f'[duplicates {policy}] log(w_copy_a / w_copy_b) per check: {" ".join(f"{r:+.4f}" for r in ratios)}')
    print(f'[duplicates {policy}] final |log ratio| {abs(ratios[-1]):.4f} (bound {DUPLICATE_BOUND}); '
          f'copies together {weights[-1, a] + weights[-1, b]:.4f}')
    assert abs(ratios[-1]) <= DUPLICATE_BOUND
