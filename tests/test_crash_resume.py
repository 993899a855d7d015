"""Crash and resume (issue 6, item 1): a 2-process FSDP2 run killed with SIGKILL mid-epoch and relaunched
with autoresume continues from its last checkpoint as if it had never been killed.

The scenario lives in tests/crash_helpers.py (:func:`crash_and_resume`) so the fault matrix can run it too.
"""
import json

import pytest
from crash_helpers import KILL_AFTER, SAVE_EVERY, SIZES, TOTAL, count_lost_and_repeated, crash_and_resume

from test_data import private_shm_available


def steps_of(stream: list[list[tuple[int, int]]]) -> dict:
    return {step: batch for step, batch in enumerate(stream, start=1)}


# Domain 0 has 8 samples (one pass in 4 steps), domain 1 has 2 (two passes).
REFERENCE = steps_of([[(0, 5), (0, 2), (1, 1)], [(0, 7), (0, 0), (1, 0)], [(0, 1), (0, 6), (1, 0)],
                      [(0, 3), (0, 4), (1, 1)]])
R1, R2, R3, R4 = (REFERENCE[s] for s in (1, 2, 3, 4))


def test_counting_finds_nothing_in_the_uninterrupted_stream():
    assert count_lost_and_repeated(REFERENCE, REFERENCE, [8, 2]) == {0: {'lost': 0, 'repeated': 0},
                                                                     1: {'lost': 0, 'repeated': 0}}


@pytest.mark.parametrize('stitched, expected', [
    # The loader resumed one step behind its checkpoint: step 2's samples twice, step 4's never.
    ([R1, R2, R2, R3], {0: {'lost': 2, 'repeated': 2}, 1: {'lost': 1, 'repeated': 1}}),
    # The loader resumed one step ahead: step 2's samples never trained on.
    ([R1, R3, R4], {0: {'lost': 2, 'repeated': 0}, 1: {'lost': 1, 'repeated': 0}}),
    # The loader restarted every domain from the beginning after step 1.
    ([R1, R1, R2], {0: {'lost': 4, 'repeated': 2}, 1: {'lost': 2, 'repeated': 1}}),
], ids=['behind', 'ahead', 'restarted'])
def test_counting_finds_replayed_and_skipped_samples(stitched, expected):
    assert count_lost_and_repeated(REFERENCE, steps_of(stitched), [8, 2]) == expected


def test_sigkill_mid_epoch_then_autoresume_continues_as_if_never_killed(tmp_path):
    """`composer -n 2` (FSDP2, CPU, data from S3) killed with SIGKILL one step or more past its last
    checkpoint; the same command again, with the killed run's shared memory still in /dev/shm and a
    fresh TMPDIR (a new job on the same host), resumes from that checkpoint and trains on the same
    samples per step, with the same PiKE weights, as a run that was never killed."""
    if not private_shm_available():
        pytest.skip('needs `unshare --mount` (root) to give the killed run and its relaunch one private /dev/shm')
    result = crash_and_resume(tmp_path)
    print(json.dumps(result))
    assert not result['failures'], '\n'.join(result['failures'])
    assert result['survived'] and result['samples_lost'] == 0 and result['samples_repeated'] == 0
    assert KILL_AFTER < result['killed_after_step'] < TOTAL and result['killed_after_step'] % SAVE_EVERY
    assert result['resumed_from_step'] == result['killed_after_step'] // SAVE_EVERY * SAVE_EVERY
    assert result['stale_shm_entries'] > 0  # the relaunch started over shared memory the kill left behind
    assert max(result['domain_passes'].values()) > 1  # some domain began a second pass within the run
    assert len(SIZES) == len(result['per_domain'])
