"""streaming_prep: per-domain corpora -> tokenized, packed MDS shards plus a manifest (``pike-prep``).

Public API:
    prepare(domains, out, ...) -> manifest dict   (see streaming_prep.pipeline.prepare)
    PrepError                                     (user errors; str() is a one-line message)
"""

from streaming_prep.errors import PrepError
from streaming_prep.pipeline import MANIFEST_FORMAT, prepare

__all__ = ["MANIFEST_FORMAT", "PrepError", "prepare"]
