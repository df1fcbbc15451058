"""Persistent AST embedding cache: extract each clip once, reuse it across rounds, runs and nodes.

* :mod:`common.cache.key`   - what a cache is keyed by (encoder identity, storage dtype) and dataset ids.
* :mod:`common.cache.store` - the on-disk store: safetensors shards, checksummed index, locking, repair.
* :mod:`common.cache.embed` - clips -> embeddings through the cache (the one extraction path).

The CLI (``feda2v cache build|info|verify|clear``) is in :mod:`common.cache.commands`.
"""

from common.cache.embed import EmbedResult, EmbedStats, ExtractionSettings, LazyEncoder, embed_clips, open_store
from common.cache.key import cache_key, cache_key_fields, dataset_id, diff_fields
from common.cache.store import ClipId, EmbeddingStore, VerifyReport, list_stores

__all__ = [
    "ClipId",
    "EmbedResult",
    "EmbedStats",
    "EmbeddingStore",
    "ExtractionSettings",
    "LazyEncoder",
    "VerifyReport",
    "cache_key",
    "cache_key_fields",
    "dataset_id",
    "diff_fields",
    "embed_clips",
    "list_stores",
    "open_store",
]
