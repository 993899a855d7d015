"""Object-store faults (issue 6, item 2): a proxy on 127.0.0.1 in front of moto answers a fraction of GETs
with 500/503, slowly, with a connection dropped mid-body or with a flipped byte (tests/s3_faults.py).

Reading continues through retries and yields exactly the samples a fault-free read yields; a shard
that stays unavailable ends the read with an error naming the domain, the shard and the remote; a
tiny training run from S3 through the faults trains on the same samples, with the same PiKE
weights and held-out losses, as the same run from local shards.
"""
from __future__ import annotations

import logging

import pytest
from s3_faults import FLAKY, FaultPlan, FaultyS3Proxy, flaky_read, unavailable_read
from test_data import upload_tree
from test_train import DOMAINS, run, uninterrupted, write_manifest  # noqa: F401 (uninterrupted is a fixture)

FAULT_KINDS = ('error', 'drop', 'corrupt', 'slow')


@pytest.mark.parametrize('num_workers', [0, 2])
def test_reads_through_a_flaky_object_store_yield_exactly_the_fault_free_samples(s3_server, tmp_path, caplog,
                                                                                 num_workers):
    with caplog.at_level(logging.WARNING, logger='composer_pike.data'):
        result = flaky_read(tmp_path, s3_server.client(), s3_server.endpoint_url, num_workers)
    outcome, counts = result['outcome'], result['counts']
    assert 'value' in outcome, f'{outcome}; faults injected: {dict(counts)}'
    assert outcome['value'] == result['expected']
    assert all(counts[kind] > 0 for kind in (*FAULT_KINDS, 'ok')), counts  # every kind of fault was injected
    if num_workers == 0:  # the flipped bytes were caught by the shard hash check and downloaded again
        assert 'does not match its xxh64 hash (download 1 of 3)' in caplog.text


def test_workers_never_share_the_main_process_object_store_connections(s3_server, tmp_path, caplog):
    """DataLoader workers are forked after the main process has fetched indexes (and prefetches in
    threads) over keep-alive connections. A worker reusing an inherited connection reads responses
    meant for the main process: shard files holding HTTP headers, re-downloaded after their hash
    check fails. With its own connections every shard file is fetched exactly once from a clean store."""
    with caplog.at_level(logging.WARNING, logger='composer_pike.data'):
        result = flaky_read(tmp_path, s3_server.client(), s3_server.endpoint_url, num_workers=2, plan=FaultPlan())
    assert result['outcome'].get('value') == result['expected'], result['outcome']
    assert 'does not match' not in caplog.text
    # A GET whose connection broke before the answer was sent (the proxy's link to moto, under load) is
    # retried by the S3 client: a transport retry, not a second download. Each shard file must be served once.
    served = {key: [entry for entry in entries if 'failed' not in entry]
              for key, entries in result['get_log'].items() if key.endswith(('.mds', '.mds.zstd'))}
    assert served and all(served.values()), served
    assert all(len(entries) == 1 for entries in served.values()), ({k: v for k, v in served.items() if len(v) > 1},
                                                                  result['get_log'], caplog.text)


def test_a_shard_that_stays_unavailable_ends_the_read_naming_domain_shard_and_remote(s3_server, tmp_path):
    """Whether the prefetcher or a reader meets the shard first, the read that needs it fails, never hangs."""
    result = unavailable_read(tmp_path, s3_server.client(), s3_server.endpoint_url, needed=True)
    outcome = result['outcome']
    assert 'hung' not in outcome, outcome
    error = outcome.get('error')
    assert error is not None, 'every step was read although a shard it needs was unavailable'
    assert not isinstance(error, AssertionError), f'wrong samples were yielded: {error}'
    for part in ("domain 'forums'", result['shard'], result['remote']):
        assert part in str(error), f'the error does not name {part}: {error!r}'
    assert result['counts']['unavailable'] >= 2  # retried before giving up
    assert result['cached'] == []


def test_an_unavailable_shard_the_read_never_reaches_fails_only_its_prefetch(s3_server, tmp_path):
    """The prefetcher asks for the shard (it is within its horizon) and fails; the read, which never
    needs it, yields exactly the fault-free batches."""
    result = unavailable_read(tmp_path, s3_server.client(), s3_server.endpoint_url, needed=False)
    outcome = result['outcome']
    assert 'value' in outcome, outcome
    assert outcome['value'] == result['expected']
    failures = [error for error in result['prefetch_failed'] if result['shard'] in error]
    assert failures, f'the prefetcher never failed on the shard: {result["prefetch_failed"]}'
    for part in ("domain 'forums'", result['remote']):
        assert part in failures[0], f'the prefetch failure does not name {part}: {failures[0]}'
    assert result['counts']['unavailable'] >= 1
    assert result['cached'] == []


def test_training_from_a_flaky_object_store_matches_training_from_local_shards(uninterrupted, s3_server, tmp_path,
                                                                              monkeypatch):
    """The entry point with data.manifest=s3://... through the faulty proxy, against test_train's local run."""
    bucket = s3_server.create_bucket('pike-flaky-train')
    upload_tree(s3_server.client(), write_manifest(tmp_path / 'data'), 'pike-flaky-train', 'run')
    with FaultyS3Proxy(s3_server.endpoint_url, FLAKY) as proxy:
        monkeypatch.setenv('S3_ENDPOINT_URL', proxy.endpoint_url)
        _, recorder, series = run(tmp_path, 'flaky', f'data.manifest={bucket}/run',
                                  f'data.cache_root={tmp_path / "cache"}', 'data.download_timeout=10')
    _, full_rows, full = uninterrupted
    assert recorder.rows == full_rows.rows
    for key in [f'pike/weight/{d}' for d in DOMAINS] + [f'metrics/val_{d}/LanguageCrossEntropy' for d in DOMAINS]:
        assert series[key] == full[key], key
    assert all(proxy.counts[kind] > 0 for kind in FAULT_KINDS), proxy.counts
