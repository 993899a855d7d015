"""Train/val split by document, packing into fixed-length samples, and MDS shard writing."""

from __future__ import annotations

import time
import zlib
from concurrent.futures import Future

import numpy as np
from streaming import MDSWriter

from streaming_prep.errors import PrepError, describe


def split_is_val(n_documents: int, val_fraction: float, seed: int, domain: str) -> np.ndarray:
    """Boolean mask over documents: True for the validation split.

    A seeded permutation picks round(val_fraction * n) documents (at least 1 when
    val_fraction > 0 and n >= 2, and always leaving one for training). The generator is seeded
    with (seed, crc32 of the domain name), so domains get different but reproducible splits.
    """
    n_val = round(val_fraction * n_documents)
    if val_fraction > 0 and n_documents >= 2:
        n_val = min(max(n_val, 1), n_documents - 1)
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    is_val = np.zeros(n_documents, dtype=bool)
    is_val[rng.permutation(n_documents)[:n_val]] = True
    return is_val


def pack(documents: list[np.ndarray], seq_len: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Concatenate token arrays and cut them into rows of seq_len tokens.

    Returns (samples of shape (n_samples, seq_len), number of tokens dropped from the end).
    """
    stream = np.concatenate(documents) if documents else np.zeros(0, dtype=dtype)
    n_samples = len(stream) // seq_len
    return stream[: n_samples * seq_len].reshape(n_samples, seq_len), len(stream) - n_samples * seq_len


def mds_columns(seq_len: int, dtype: np.dtype) -> dict[str, str]:
    """The MDS columns: fixed-shape token rows and the domain name."""
    return {"tokens": f"ndarray:{dtype.name}:{seq_len}", "domain": "str"}


class PackedMDSWriter(MDSWriter):
    """An MDSWriter that takes a whole (n_samples, seq_len) token array in one call.

    Calling ``write`` once per sample costs tens of microseconds each; this encodes one
    sample to learn the byte layout, then builds the samples of a chunk by slicing one buffer.
    The shards are byte-identical to writing the same samples one by one (a test checks this).
    """

    chunk_bytes = 16 << 20  # samples are encoded this many bytes at a time, to bound memory
    upload_error: BaseException | None = None  # the first failed shard upload

    def write_samples(self, tokens: np.ndarray, domain: str) -> None:
        """Append samples (rows of tokens, all with this domain name), starting shards as needed."""
        if len(tokens) == 0:
            return
        token_bytes = tokens.shape[1] * tokens.dtype.itemsize
        encoded = self.encode_sample({"tokens": tokens[0], "domain": domain})
        prefix = np.frombuffer(encoded[:-token_bytes], dtype=np.uint8)  # the domain column
        sample_size = len(encoded)
        cost = sample_size + self.extra_bytes_per_sample  # what write() adds to the shard size
        if self.size_limit and self.extra_bytes_per_shard + cost > self.size_limit:
            raise PrepError(
                f"--size-limit {self.size_limit} bytes cannot hold one sample "
                f"({self.extra_bytes_per_shard + cost} bytes with the shard header)"
            )
        rows_per_chunk = max(1, self.chunk_bytes // sample_size)
        for first in range(0, len(tokens), rows_per_chunk):
            chunk = np.ascontiguousarray(tokens[first : first + rows_per_chunk])
            rows = np.empty((len(chunk), sample_size), dtype=np.uint8)
            rows[:, : len(prefix)] = prefix
            rows[:, len(prefix) :] = chunk.view(np.uint8).reshape(len(chunk), token_bytes)
            buffer = rows.tobytes()
            samples = [buffer[i : i + sample_size] for i in range(0, len(buffer), sample_size)]
            if first == 0:
                assert samples[0] == encoded, "MDS sample layout is not [domain column][tokens]"
            self._append(samples, cost)

    def finish(self) -> None:
        """Write the last shard and index.json (and finish uploads).

        MDSWriter polls for queued shard uploads in 1 s sleeps before it writes index.json,
        which costs up to a second per split even for local output; poll in 10 ms steps first.
        """
        if self.new_samples and not self.event.is_set():
            self.flush_shard()
            self._reset_cache()
        while self.executor._work_queue.qsize() > 0:
            time.sleep(0.01)
        try:
            super().finish()
        except Exception:
            if self.upload_error is None:
                raise
            raise self._upload_failed() from None

    def exception_callback(self, future: Future) -> None:
        """Remember the first failed upload for :meth:`_upload_failed`, instead of streaming's
        logging it (a log line that can hold the endpoint URL). Cancelled uploads are not failures."""
        if future.cancelled() or future.exception() is None:
            return
        if self.upload_error is None:
            self.upload_error = future.exception()
        self.event.set()

    def _upload_failed(self) -> PrepError:
        return PrepError(f"uploading a shard failed: {describe(self.upload_error)}", file=self.remote)

    def _append(self, samples: list[bytes], cost: int) -> None:
        """Add encoded samples to the current shard, flushing it whenever the next would not fit."""
        start = 0
        while start < len(samples):
            room = len(samples) - start
            if self.size_limit:
                room = min(room, (self.size_limit - self.new_shard_size) // cost)
            if room <= 0:
                if self.event.is_set():  # as write() does: stop if an upload thread failed
                    self.cancel_future_jobs()
                    raise self._upload_failed()
                self.flush_shard()
                self._reset_cache()
                continue
            self.new_samples.extend(samples[start : start + room])
            self.new_shard_size += room * cost
            start += room


def write_split(
    out: str | tuple[str, str],
    samples: np.ndarray,
    domain: str,
    *,
    compression: str | None,
    hashes: list[str],
    size_limit: int,
) -> None:
    """Write one split's samples as MDS shards plus index.json.

    out is a local directory, or (local directory, remote URL) to upload each shard as it is made.
    """
    try:
        writer = PackedMDSWriter(
            out=out,
            columns=mds_columns(samples.shape[1], samples.dtype),
            compression=compression,
            hashes=hashes,
            size_limit=size_limit,
        )
    except Exception as err:  # a remote's client checks the bucket here; each cloud SDK has its own errors
        if isinstance(out, str):
            raise
        raise PrepError(f"cannot write here: {describe(err)}", file=out[1]) from None
    try:
        writer.write_samples(samples, domain)
    except BaseException:
        writer.cancel_future_jobs()  # and do not finish(): no index.json for a failed split
        raise
    writer.finish()
