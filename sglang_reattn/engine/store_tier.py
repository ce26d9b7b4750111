"""The disk tier: completed chunks are written behind into the LMDB chunk store, and a
request whose prefix is in the store loads it instead of recomputing it, across
requests, server restarts and processes.

Chunk ids are the store's chained SHA-256 (SGLang's page hashes, salted by namespace).
Copies out of the KV pool happen on the engine thread (the pages may be reused right
after); compression and the LMDB transaction run on a writer thread. Summaries of loaded
chunks are recomputed from the loaded keys, so a restored chunk scores exactly like one
computed in this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from typing import Any

import numpy as np
import torch

from sglang_reattn.kv_store import ChunkRecord, ChunkStore, CorruptBlock, StoreError, chunk_hashes

logger = logging.getLogger(__name__)


def parse_bytes(text: str) -> int:
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def engine_fingerprint(cfg, dtype: torch.dtype, chunk_size: int, tokenizer, model) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    emb = model.embed_tokens.weight
    # Identity of the weights, cheaply: two models of one shape must not share KV.
    sample = emb[:: max(1, emb.shape[0] // 64)].float().cpu().numpy().tobytes()
    return {
        "architecture": cfg.architecture, "num_layers": cfg.num_layers,
        "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "dtype": str(dtype).removeprefix("torch."), "chunk_size": chunk_size,
        "summary_kind": "minmax", "rope": {"theta": cfg.rope_theta,
                                           "scaling": cfg.rope_scaling or {}},
        "tokenizer_hash": hashlib.sha256(vocab.encode()).hexdigest()[:32],
        "weights_hash": hashlib.sha256(sample).hexdigest()[:32],
    }


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(dtype) if dtype == torch.bfloat16 else t.to(dtype)


class StoreTier:
    def __init__(self, path: str, fingerprint: dict, capacity: str, codec: str, pool,
                 on_loaded) -> None:
        self.store = ChunkStore(path, fingerprint, capacity_bytes=parse_bytes(capacity),
                                codec=codec)
        self.pool = pool
        self.c = pool.page_size
        self.on_loaded = on_loaded  # (pages tensor) -> None: refresh summaries
        self._known: set[str] = set()
        self._q: queue.Queue = queue.Queue()
        self.stats = {"store_chunks_written": 0, "store_chunks_loaded": 0,
                      "store_bytes_loaded": 0, "store_write_errors": 0,
                      "store_corrupt_blocks": 0}
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer",
                                        daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ write behind

    def save(self, token_ids: list[int], pages: list[int], first: int, namespace: str) -> None:
        """Persist full chunks [first, len(pages)) of a sequence whose chunk i lives in
        pages[i]. Engine thread: copies the K/V out now, the writer thread stores them."""
        if first >= len(pages):
            return
        ids = chunk_hashes(token_ids[: len(pages) * self.c], self.c, namespace)
        todo = [i for i in range(first, len(pages)) if ids[i] not in self._known]
        if not todo:
            return
        present = self.store.has_many([ids[i] for i in todo])
        self._known.update(ids[i] for i, p in zip(todo, present) if p)
        todo = [i for i, p in zip(todo, present) if not p]
        if not todo:
            return
        idx = torch.tensor([pages[i] for i in todo], device=self.pool.k.device)
        k = self.pool.k[:, idx]  # [L, n, C, Hkv, D]
        v = self.pool.v[:, idx]
        kf = k.float()
        summary = torch.stack([kf.amin(2), kf.amax(2)], dim=2)  # [L, n, 2, Hkv, D]
        k_np, v_np = _to_numpy(k), _to_numpy(v)
        s_np = summary.permute(1, 0, 2, 3, 4).contiguous().cpu().numpy()
        c = self.c
        records = [ChunkRecord(ids[i], ids[i - 1] if i else None, namespace,
                               token_ids[i * c:(i + 1) * c], k_np[:, j], v_np[:, j], s_np[j])
                   for j, i in enumerate(todo)]
        self._known.update(ids[i] for i in todo)
        self._q.put(records)

    def _write_loop(self) -> None:
        while True:
            records = self._q.get()
            try:
                if records is None:
                    return
                self.store.put_chunks(records)
                self.stats["store_chunks_written"] += len(records)
            except (StoreError, ValueError) as e:
                self.stats["store_write_errors"] += 1
                for r in records:
                    self._known.discard(r.chunk_id)
                logger.warning("kv store write failed (%d chunks): %s", len(records), e)
            finally:
                self._q.task_done()

    def flush(self) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        self._q.join()

    # ------------------------------------------------------------------ reuse

    def lookup(self, token_ids: list[int], namespace: str, start: int, stop: int) -> list[str]:
        """Ids of the stored chunks [start, start + n) of the sequence, n maximal <= stop."""
        if stop <= start:
            return []
        ids = chunk_hashes(token_ids[: stop * self.c], self.c, namespace)[start:stop]
        out: list[str] = []
        for cid, there in zip(ids, self.store.has_many(ids)):
            if not there:
                break
            out.append(cid)
        return out

    def load(self, chunk_ids: list[str], pages: list[int]) -> int:
        """Copy stored chunks into pool pages; returns how many leading chunks loaded. A
        corrupt block is reported and its chunk dropped from the store (recomputed)."""
        n = len(chunk_ids)
        try:
            for layer in range(self.pool.k.shape[0]):
                k, v = self.store.get_kv_many(chunk_ids[:n], layer)
                idx = torch.tensor(pages[:n], device=self.pool.k.device)
                self.pool.k[layer, idx] = _from_numpy(k, self.pool.k.dtype).to(self.pool.k.device)
                self.pool.v[layer, idx] = _from_numpy(v, self.pool.v.dtype).to(self.pool.v.device)
                self.stats["store_bytes_loaded"] += k.nbytes + v.nbytes
        except CorruptBlock as e:
            self.stats["store_corrupt_blocks"] += 1
            logger.error("kv store: %s; dropping it, it will be recomputed", e)
            bad = chunk_ids.index(e.chunk_id) if e.chunk_id in chunk_ids else 0
            try:
                self.store.delete(e.chunk_id, reason="checksum mismatch")
            except StoreError:
                pass
            self._known.discard(e.chunk_id)
            return self.load(chunk_ids[:bad], pages[:bad]) if bad else 0
        if n:
            self.on_loaded(torch.tensor(pages[:n], device=self.pool.k.device))
            self.stats["store_chunks_loaded"] += n
        return n

    def close(self) -> None:
        self._q.put(None)
        self._writer.join(timeout=60)
        self.store.close()

    def info(self) -> dict[str, Any]:
        return dict(self.stats, **{f"store_{k}": v for k, v in self.store.stats().items()
                                   if isinstance(v, (int, float))})
