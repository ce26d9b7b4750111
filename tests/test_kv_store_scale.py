"""A synthetic store of 2M tokens is written, reopened and read back well under a minute."""

from __future__ import annotations

import time

import numpy as np
from sglang_reattn.kv_store import ChunkStore
from sglang_reattn.kv_store.synthetic import kv_for, make_chain, tiny_fingerprint

FP = tiny_fingerprint(num_layers=2, num_kv_heads=1, head_dim=8, chunk_size=64)
N_TOKENS = 2_000_000


def test_two_million_tokens(tmp_path):
    n_chunks = -(-N_TOKENS // FP["chunk_size"])
    t0 = time.perf_counter()
    with ChunkStore(tmp_path, FP, 4 << 30, initial_map_size=16 << 20) as s:
        parent, per_chain = None, 2048
        chain_ids = []
        for start in range(0, n_chunks, per_chain):  # one long document, in batches
            recs = make_chain(FP, min(per_chain, n_chunks - start), seed=start, parent_id=parent)
            s.put_chunks(recs)
            parent = recs[-1].chunk_id
            chain_ids += [r.chunk_id for r in recs]
        s.put_context("book", parent, n_chunks * FP["chunk_size"], pinned=True)
    t_write = time.perf_counter() - t0

    with ChunkStore(tmp_path, FP, readonly=True) as s:
        heads = {h.chunk_id: h for h in s.iter_headers()}
        assert len(heads) == n_chunks and s.stats()["chunks"] == n_chunks
        assert sum(len(h.token_ids) for h in heads.values()) >= N_TOKENS
        # the chain is intact from the context back to the root
        cid, depth = s.get_context("book").last_chunk_id, 0
        while cid is not None:
            cid, depth = heads[cid].parent_id, depth + 1
        assert depth == n_chunks and heads[chain_ids[0]].pin_count == 1
        for layer in range(FP["num_layers"]):
            for i in range(0, n_chunks, 4096):
                ids = chain_ids[i : i + 4096]
                k, v = s.get_kv_many(ids, layer)
                for j in range(0, len(ids), 97):  # spot-check exact contents
                    wk, wv = kv_for(ids[j], FP)
                    assert np.array_equal(k[j], wk[layer]) and np.array_equal(v[j], wv[layer])
    t_total = time.perf_counter() - t0
    print(f"2M tokens: write {t_write:.1f} s, total {t_total:.1f} s")
    assert t_total < 50
