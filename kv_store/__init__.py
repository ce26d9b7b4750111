"""LMDB chunk store: KV blocks, summaries, headers and named contexts of long contexts.

Depends only on numpy, lmdb and zstandard; imports nothing else of sglang_reattn.
"""

from .codecs import CODEC_IDS
from .errors import ChunkNotFound, CorruptBlock, ModelMismatch, StoreError, StoreFull
from .hashing import chunk_hashes, chunk_id, namespace_seed
from .records import ChunkHeader, ChunkRecord, ContextInfo, numpy_dtype
from .store import FORMAT_VERSION, ChunkStore

CODECS = tuple(CODEC_IDS)

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "ChunkHeader",
    "ChunkNotFound",
    "ChunkRecord",
    "ChunkStore",
    "ContextInfo",
    "CorruptBlock",
    "ModelMismatch",
    "StoreError",
    "StoreFull",
    "chunk_hashes",
    "chunk_id",
    "namespace_seed",
    "numpy_dtype",
]
