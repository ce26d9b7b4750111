"""Named contexts: a document prefilled once into the KV store, under a name, that later
requests (any process, any server run) can put in front of their prompt."""

from __future__ import annotations

from typing import Any, Callable

from sglang_reattn.errors import InvalidRequest


class NamedContexts:
    """Mixed into `Engine` (needs `store_tier`, `tokenizer`, `args`, `generate`)."""

    def _tier(self):
        if self.store_tier is None:
            raise InvalidRequest("named contexts need the disk tier: start with --kv-store-path")
        return self.store_tier

    def ingest(self, name: str, text: str | None = None, input_ids: list[int] | None = None,
               namespace: str = "", pin: bool = False,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Prefill a document piece by piece (each piece reuses all before it), store its
        chunks and record them under `name`. Returns the context's description.

        A context is made of whole chunks: a trailing partial chunk (fewer than
        --reattn-chunk-size tokens) is not part of it; send those tokens with the prompt."""
        tier = self._tier()
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidRequest("a context name must be a non-empty string without '/'")
        if (text is None) == (input_ids is None):
            raise InvalidRequest("give exactly one of text and input_ids")
        ids = self.tokenizer.encode(text) if text is not None else list(input_ids)
        c, piece = self.args.reattn_chunk_size, self.args.chunked_prefill_size
        full = len(ids) // c * c
        if full == 0:
            raise InvalidRequest(f"the document has {len(ids)} tokens, less than one chunk ({c})")
        done = 0
        while done < len(ids):
            end = min(done + piece, len(ids))
            self.generate(input_ids=ids[:end], sampling_params={"max_new_tokens": 1},
                          extra_key=namespace or None)
            if progress is not None:
                progress(end - done)
            done = end
        tier.flush()
        from sglang_reattn.kv_store import chunk_hashes

        last = chunk_hashes(ids[:full], c, namespace)[-1]
        info = tier.store.put_context(name, last, full, namespace=namespace, pinned=pin)
        return self._describe(info)

    def list_contexts(self) -> list[dict[str, Any]]:
        return [self._describe(i) for i in self._tier().store.list_contexts()]

    def delete_context(self, name: str) -> None:
        self._context_info(name)
        self._tier().store.delete_context(name)

    def pin_context(self, name: str, pinned: bool = True) -> dict[str, Any]:
        self._context_info(name)
        return self._describe(self._tier().store.pin_context(name, pinned))

    def context_ids(self, name: str) -> tuple[list[int], str]:
        """The context's token ids (from the stored chunk headers) and its namespace."""
        info = self._context_info(name)
        store = self._tier().store
        chunks: list[tuple[int, ...]] = []
        cid = info.last_chunk_id
        while cid:
            h = store.get_header(cid)
            chunks.append(h.token_ids)
            cid = h.parent_id
        return [t for chunk in reversed(chunks) for t in chunk], info.namespace

    def _context_info(self, name: str):
        from sglang_reattn.kv_store import ChunkNotFound

        try:
            return self._tier().store.get_context(name)
        except ChunkNotFound:
            raise InvalidRequest(f"unknown context {name!r}") from None

    def _describe(self, info) -> dict[str, Any]:
        cfg = self.model_config
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        return {"name": info.name, "namespace": info.namespace, "tokens": info.token_count,
                "bytes": info.token_count * per_token, "pinned": info.pinned,
                "created": info.created, "last_used": info.last_used}

    def _with_context(self, context: str | None, prompt, input_ids, extra_key):
        """Put a named context's tokens in front of each prompt; its namespace applies."""
        if context is None:
            return prompt, input_ids, extra_key
        ctx, namespace = self.context_ids(context)
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
        return None, (ids if batch else ids[0]), namespace or None
