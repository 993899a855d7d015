"""Fixtures shared by the test files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run: `make test` is deterministic, and a draw that
# finds a new counterexample cannot fail one CI run and pass the next. HYPOTHESIS_PROFILE=explore
# draws fresh examples (and keeps what it finds in .hypothesis/) when looking for counterexamples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1; S3_ENDPOINT_URL and dummy credentials point at it."""

    endpoint_url: str

    def client(self):
        """A boto3 S3 client for this server."""
        from s3_faults import s3_client

        return s3_client(self.endpoint_url)

    def create_bucket(self, name: str) -> str:
        """Create a bucket (if missing) and return its URL, ``s3://name``."""
        client = self.client()
        if name not in {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """Session-wide moto S3 server (server mode, so other processes can reach it).

    Sets S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID/SECRET (``testing``) and AWS_DEFAULT_REGION for the
    session, restoring them afterwards. Use a distinct bucket or prefix per test.
    """
    from s3_faults import S3_TEST_ENV, moto_server

    with moto_server() as endpoint_url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("S3_ENDPOINT_URL", endpoint_url)
        for name, value in S3_TEST_ENV.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        yield S3Server(endpoint_url)


def _raise_open_file_limit() -> None:
    """Every StreamingDataset keeps file descriptors open for the life of the process; one pytest
    process builds hundreds of them, so lift the soft limit to the hard limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_open_file_limit()

