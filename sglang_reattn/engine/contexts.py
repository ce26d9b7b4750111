"""Named contexts: a document prefilled once into the KV store, under a name, that later
requests (any process, any server run) can put in front of their prompt."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from sglang_reattn.errors import (
    ContextIncomplete,
    InvalidRequest,
    ReAttnError,
    StoreFullError,
    StoreReadOnly,
)
from sglang_reattn.kv_store import ChunkNotFound, CorruptBlock, StoreFull


CHAIN_CACHE = 4  # named contexts whose chunk ids and tokens a process keeps,
CHAIN_CACHE_TOKENS = 1 << 23  # and at most this many tokens of them in all (64 MB)


def _store_full(e: Exception) -> StoreFullError:
    return StoreFullError(f"StoreFull: {e}")


class NamedContexts:
    """Mixed into `Engine` (needs `store_tier`, `tokenizer`, `args`, `generate`; its
    `__init__` calls `_init_contexts`)."""

    def _init_contexts(self) -> None:
        # name -> ((last chunk, tokens, removals), chunk ids, tokens): `_context_chain`
        self._chains: OrderedDict[str, tuple] = OrderedDict()
        self._chains_lock = threading.Lock()

    def _tier(self, write: bool = False):
        if self.store_tier is None:
            raise InvalidRequest("named contexts need the disk tier: start without "
                                 "--disable-kv-store (or give --kv-store-path)")
        if write and self.store_tier.readonly:
            raise StoreReadOnly("the disk tier is read-only in this server "
                                "(--kv-store-readonly); create, pin and delete contexts "
                                "through a server or `ingest` that writes the store")
        return self.store_tier

    def ingest(self, name: str, text: str | None = None, input_ids: list[int] | None = None,
               namespace: str = "", pin: bool = False,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Prefill a document piece by piece (each piece reuses all before it), store its
        chunks and record them under `name`. Returns the context's description.

        The document's whole chunks are stored with their KV; its trailing partial chunk
        (fewer than --reattn-chunk-size tokens) is kept as token ids in the context's
        record and recomputed with each request."""
        tier = self._tier(write=True)
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidRequest("a context name must be a non-empty string without '/'")
        if (text is None) == (input_ids is None):
            raise InvalidRequest("give exactly one of text and input_ids")
        ids = self.tokenizer.encode(text) if text is not None else list(input_ids)
        c, piece = self.args.reattn_chunk_size, self.args.chunked_prefill_size
        full = len(ids) // c * c
        if not ids:
            raise InvalidRequest("the document is empty")
        errors_before = tier.stats["store_write_errors"]
        full_before = tier.stats["store_full_errors"]
        done = 0
        while done < len(ids):
            end = min(done + piece, len(ids))
            out = self.generate(input_ids=ids[:end], sampling_params={"max_new_tokens": 1},
                                extra_key=namespace or None)
            reason = out["meta_info"]["finish_reason"] or {}
            if reason.get("type") == "abort":
                raise ReAttnError(f"ingest stopped at token {done} of {len(ids)}: "
                                  f"{reason.get('message', 'aborted')}")
            if getattr(self, "stream_tier", None) is not None:
                # A streamed piece's chunks reach the next piece through the store only
                # (they never enter the in-memory prefix tree): wait for them.
                tier.flush()
            if progress is not None:
                progress(end - done)
            done = end
        tier.flush()
        from sglang_reattn.kv_store import chunk_hashes

        chain = chunk_hashes(ids[:full], c, namespace)
        missing = sum(not there for there in tier.store.has_many(chain))
        if missing:  # the writes failed (full store), or other writes evicted them
            what = (f"{missing} of the document's {len(chain)} chunks could not be kept in "
                    f"the disk tier {tier.path}")
            if tier.stats["store_full_errors"] > full_before:
                raise _store_full(f"{what}: {tier.last_full}")
            if tier.stats["store_write_errors"] > errors_before:
                err = tier.last_error
                raise ReAttnError(f"{what}: {type(err).__name__}: {err}")
            raise _store_full(f"{what}: evicted by other writes meanwhile")
        tier.touch(chain)  # a re-ingested document is recent again
        try:
            info = tier.store.put_context(name, chain[-1] if chain else None, full,
                                          namespace=namespace, pinned=pin, tail=ids[full:])
        except (StoreFull, ChunkNotFound) as e:  # map ceiling; evicted since the check
            raise _store_full(e) from None
        return self._describe(info)

    def list_contexts(self) -> list[dict[str, Any]]:
        return [self._describe(i) for i in self._tier().store.list_contexts()]

    def delete_context(self, name: str) -> None:
        tier = self._tier(write=True)
        self._context_info(name)
        try:
            tier.store.delete_context(name)
        except StoreFull as e:
            raise _store_full(e) from None

    def pin_context(self, name: str, pinned: bool = True) -> dict[str, Any]:
        tier = self._tier(write=True)
        self._context_info(name)
        try:
            return self._describe(tier.store.pin_context(name, pinned))
        except StoreFull as e:
            raise _store_full(e) from None

    def context_ids(self, name: str) -> tuple[list[int], str, list[str], Any]:
        """The context's token ids (from the stored chunk headers), its namespace, its
        stored chunks' ids, root first (the chunk ids of a request that starts with it),
        and their tokens as an int64 array (the ids up to the tail).

        A context that lost chunks (evicted while unpinned, or damaged) is refused with
        ContextIncomplete rather than silently answering from what is left of it. The last
        CHAIN_CACHE contexts read (CHAIN_CACHE_TOKENS tokens at most, or the last one) are
        kept while no chunk leaves the store."""
        info = self._context_info(name)
        whole = info.token_count + info.lost_tokens

        def incomplete(why: str) -> ContextIncomplete:
            return ContextIncomplete(
                f"context {name!r} is incomplete: {why}; its document has to be ingested "
                "again (POST /contexts); pin a context to keep it from eviction")

        if info.lost_tokens:
            raise incomplete(f"{info.lost_tokens} of its {whole} tokens were evicted from "
                             "the disk tier or dropped as damaged")
        chain, tokens = self._context_chain(info, incomplete)
        # Marked used behind the request: marked now, the writer's transaction for a
        # million-token context (100 ms) held up the request's own writes.
        self._tier().touch(chain, now=False)
        return tokens.tolist() + list(info.tail), info.namespace, chain, tokens

    def _context_chain(self, info, incomplete) -> tuple[list[str], Any]:
        """(chunk ids, int64 token ids) of a context's stored chain, from the cache or read
        (`ChunkStore.chain`, one read transaction)."""
        tier = self._tier()
        lock, chains = self._chains_lock, self._chains
        stamp = (info.last_chunk_id, info.token_count, tier.store.removed_total())
        with lock:
            got = chains.get(info.name)
            if got is not None and got[0] == stamp:
                chains.move_to_end(info.name)
                return got[1], got[2]
        chain, tokens = [], np.empty(0, np.int64)
        if info.last_chunk_id:
            try:
                chain, tokens = tier.store.chain(info.last_chunk_id)
            except CorruptBlock as e:
                tier.stats["store_corrupt_blocks"] += 1
                tier.drop_corrupt(e.chunk_id)
                raise incomplete(f"a chunk header failed its checksum ({e})") from None
            except ChunkNotFound as e:
                raise incomplete(f"chunk {e.chunk_id} is no longer in the disk tier") from None
        if len(tokens) != info.token_count:
            raise incomplete(f"{len(tokens)} tokens stored of {info.token_count}")
        with lock:
            chains[info.name] = (stamp, chain, tokens)
            while len(chains) > CHAIN_CACHE or (
                    len(chains) > 1
                    and sum(len(v[2]) for v in chains.values()) > CHAIN_CACHE_TOKENS):
                chains.popitem(last=False)
        return chain, tokens

    def _context_info(self, name: str):
        from sglang_reattn.kv_store import ChunkNotFound

        try:
            return self._tier().store.get_context(name)
        except ChunkNotFound:
            raise InvalidRequest(f"unknown context {name!r}") from None

    def _describe(self, info) -> dict[str, Any]:
        cfg = self.model_config
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        return {"name": info.name, "namespace": info.namespace,
                "tokens": info.token_count + len(info.tail), "stored_tokens": info.token_count,
                "bytes": info.token_count * per_token, "pinned": info.pinned,
                "created": info.created, "last_used": info.last_used,
                "lost_tokens": info.lost_tokens, "complete": not info.lost_tokens}

    def _with_context(self, context: str | None, prompt, input_ids, extra_key):
        """Put a named context's tokens in front of each prompt; its namespace applies.
        -> (prompt, input_ids, extra_key, chunk ids, prefix): the context's chunk ids and
        their tokens as an int64 array, the requests' first, read from the store (without
        a context: (), None)."""
        if context is None:
            return prompt, input_ids, extra_key, (), None
        ctx, namespace, chain, tokens = self.context_ids(context)
        if extra_key not in (None, "", namespace):
            raise InvalidRequest(f"extra_key differs from context {context!r}'s namespace")
        if prompt is not None:
            batch = isinstance(prompt, list)
            ids = [self.tokenizer.encode(p) for p in (prompt if batch else [prompt])]
        elif input_ids is not None:
            batch = bool(input_ids) and isinstance(input_ids[0], list)
            ids = input_ids if batch else [input_ids]
        else:
            batch, ids = False, [[]]
        ids = [ctx + list(x) for x in ids]
        return None, (ids if batch else ids[0]), namespace or None, chain, tokens
