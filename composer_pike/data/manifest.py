"""pike-prep manifests: where each domain's MDS splits live (local, or remote with a local cache)."""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

from streaming_prep.pipeline import MANIFEST_NAME  # the file pike-prep writes


@dataclass(frozen=True)
class DomainSource:
    """Where one domain's MDS split lives: ``remote`` (s3://..., optional) cached into ``local``."""
    name: str
    local: str
    remote: str | None = None


def sources_from_manifest(manifest: str, split: str = 'train', cache_root: str | None = None, *,
                          download_timeout: float = 60, download_retry: int = 3) -> list[DomainSource]:
    """Domain sources for ``split`` from a pike-prep manifest (local path or remote URL).

    For a remote manifest every domain is streamed into ``cache_root/<domain>/<split>``.
    """
    data = read_manifest(manifest, cache_root, timeout=download_timeout, retry=download_retry)
    return manifest_sources(data, manifest, split, cache_root)


def manifest_sources(data: dict[str, Any], manifest: str, split: str = 'train',
                     cache_root: str | None = None) -> list[DomainSource]:
    """Domain sources for ``split`` from ``data``, the manifest ``read_manifest`` loaded from ``manifest``."""
    remote = '://' in manifest
    if remote:
        base = manifest.rsplit('/', 1)[0] if manifest.endswith('.json') else manifest.rstrip('/')
    else:  # absolute, so the sources stay valid if the working directory changes
        base = os.path.abspath(manifest)
        base = os.path.dirname(base) if manifest.endswith('.json') else base
    sources = []
    for name, info in data['domains'].items():
        if split not in info['splits']:
            raise ValueError(f"domain '{name}': manifest {manifest} has no '{split}' split")
        rel = info['splits'][split]['path']
        if remote:
            sources.append(DomainSource(name, os.path.join(cache_root, name, split), f'{base}/{rel}'))
        else:
            sources.append(DomainSource(name, os.path.join(base, rel)))
    return sources


def read_manifest(manifest: str, cache_root: str | None = None, *, timeout: float = 60,
                  retry: int = 3) -> dict[str, Any]:
    """Load a pike-prep manifest from a local path (file or directory) or a remote URL.

    A remote manifest is downloaded on every call (to ``cache_root/manifest.json``, within ``timeout``
    seconds, tried again up to ``retry`` times as streaming's ``download_retry``), so a dataset rewritten
    at the remote is never described by a stale local copy. A file that is not JSON, or has no
    ``domains`` with a ``path`` per split, fails naming the file.
    """
    if '://' in manifest:
        url = manifest if manifest.endswith('.json') else f'{manifest.rstrip("/")}/{MANIFEST_NAME}'
        if cache_root is None:
            raise ValueError(f'manifest {manifest} is remote: a local cache_root is required')
        path = os.path.join(cache_root, MANIFEST_NAME)
        download_manifest(url, path, timeout=timeout, retry=retry)
    else:
        path = manifest if manifest.endswith('.json') else os.path.join(manifest, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no pike-prep manifest at {path}')
    where = manifest if '://' in manifest else path
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f'manifest {where} is not valid JSON ({error}); is it a pike-prep manifest.json?') from None
    check_manifest_domains(data, where)
    return data


def download_manifest(url: str, path: str, *, timeout: float, retry: int) -> None:
    """Download ``url`` to ``path`` (replacing it), with ``retry`` more attempts after a failure."""
    from streaming.base.storage.download import CloudDownloader
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for attempt in range(retry + 1):
        # streaming's downloaders skip a destination that exists: fetch to a fresh name, then replace.
        fresh = os.path.join(os.path.dirname(path), f'.{MANIFEST_NAME}.{uuid.uuid4().hex}')
        try:
            CloudDownloader.direct_download(url, fresh, timeout=timeout)
            os.replace(fresh, path)
            return
        except Exception:
            if attempt == retry:
                raise
        finally:
            if os.path.exists(fresh):
                os.remove(fresh)


def check_manifest_domains(data: Any, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``data`` maps ``domains`` to entries with a ``path`` per split."""
    domains = data.get('domains') if isinstance(data, dict) else None
    if not isinstance(domains, dict) or not domains:
        raise ValueError(f"manifest {where} has no 'domains' mapping; is it a pike-prep manifest.json?")
    for name, info in domains.items():
        splits = info.get('splits') if isinstance(info, dict) else None
        if not isinstance(splits, dict) or not all(isinstance(split, dict) and 'path' in split
                                                   for split in splits.values()):
            raise ValueError(f"manifest {where}: domain '{name}' needs 'splits' with a 'path' for every split")
