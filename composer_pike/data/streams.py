"""Streams that only ever expose verified shards, and the checks on a domain's index and shards."""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Sequence

from streaming import Stream

from composer_pike.data.manifest import DomainSource

log = logging.getLogger(__name__)


def check_safe_columns(domain: str, shards: Sequence[Any]) -> None:
    """Refuse columns whose MDS encoding can run code when read (pickle), naming domain and column."""
    from streaming.base.format.mds.encodings import is_mds_encoding_safe
    for shard in shards:
        for column, encoding in zip(getattr(shard, 'column_names', []), getattr(shard, 'column_encodings', [])):
            if not is_mds_encoding_safe(encoding):
                raise ValueError(f"domain '{domain}': column '{column}' has the unsafe MDS encoding '{encoding}' "
                                 f'(reading it can run arbitrary code); composer-pike reads only safe encodings: '
                                 f'write the shards without it')


def read_local_index(source: DomainSource) -> dict[str, Any]:
    """Read a local MDS index, failing with the domain named if it is missing."""
    index_path = os.path.join(source.local, 'index.json')
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"domain '{source.name}': no MDS index at {index_path}")
    with open(index_path) as f:
        return json.load(f)


def verify_local_shards(source: DomainSource, index: dict[str, Any], algorithm: str) -> None:
    """Check every local shard file of ``source`` against the ``algorithm`` hash its index.json records."""
    from streaming.base.hashing import get_hash
    for shard in index['shards']:
        for key in ('raw_data', 'zip_data'):
            info = shard.get(key)
            if not info:
                continue
            path = os.path.join(source.local, info['basename'])
            if not os.path.isfile(path):
                continue
            recorded = info.get('hashes') or {}
            if algorithm not in recorded:
                raise ValueError(f"domain '{source.name}': shard {path} records no {algorithm} hash (it has "
                                 f"{sorted(recorded)}); set validate_hash to one of them, or null to skip the check")
            with open(path, 'rb') as f:
                if get_hash(algorithm, f.read()) != recorded[algorithm]:
                    raise ValueError(f"domain '{source.name}': shard {path} does not match its {algorithm} hash")


def seq_len_of(shard: Any) -> int | None:
    """Sequence length from a shard reader's fixed-shape ``tokens`` column (``ndarray:uint16:256``)."""
    for name, encoding in zip(getattr(shard, 'column_names', []), getattr(shard, 'column_encodings', [])):
        if name == 'tokens':
            match = re.fullmatch(r'ndarray:\w+:(\d+)', encoding)
            return int(match.group(1)) if match else None
    return None


class VerifiedStream(Stream):
    """A Stream whose shard files appear in the local cache only once they pass ``validate_hash``.

    streaming (0.13) downloads a shard file (the raw one, or the compressed one) to its final path
    and checks its hash after, so a concurrent reader can read a corrupt shard, and a file that
    failed stays in the cache and fails again on every later attempt, in this run and the next.
    Here the file the remote holds is downloaded under a temporary name, checked, and only then
    renamed into place; a download whose bytes do not match (corrupted in transit) is fetched
    again, up to ``download_retry`` times, before the shard fails.
    """

    def prepare_shard(self, shard: Any) -> int:
        """Ensure ``shard`` is local; returns the change in cache usage, bytes."""
        delta = 0
        if self.remote is not None and self.validate_hash:
            for raw_info, zip_info in shard.file_pairs:
                remote_info = zip_info or raw_info  # the file the remote holds
                final = os.path.join(self.local, self.split, remote_info.basename)
                if not os.path.isfile(os.path.join(self.local, self.split, raw_info.basename)) \
                        and not os.path.isfile(final):
                    self._download_verified(remote_info, final)
                    delta += remote_info.bytes
        return delta + super().prepare_shard(shard)

    def _download_verified(self, info: Any, final: str) -> None:
        from streaming.base.hashing import get_hash
        algorithm = self.validate_hash
        if algorithm not in info.hashes:
            raise ValueError(f'{info.basename} records no {algorithm} hash (it has {sorted(info.hashes)})')
        attempts = max(1, self.download_retry)
        url = os.path.join(self.remote, self.split, info.basename)
        for attempt in range(1, attempts + 1):
            # A file left by a killed process under this name is checked like a fresh download.
            unverified = self._download_file(info.basename, f'{info.basename}.unverified')
            with open(unverified, 'rb') as f:
                matches = get_hash(algorithm, f.read()) == info.hashes[algorithm]
            if matches:
                os.replace(unverified, final)
                return
            os.remove(unverified)
            log.warning('%s does not match its %s hash (download %d of %d)', url, algorithm, attempt, attempts)
        raise ValueError(f'{url} does not match its {algorithm} hash ({attempts} downloads)')
