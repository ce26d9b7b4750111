"""The disk tier in the engine: chunks written behind, reused after a restart."""

from __future__ import annotations

import pytest
import torch

from sglang_reattn import Engine
from sglang_reattn.kv_store import ModelMismatch
from sglang_reattn.testing import make_tiny_model

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
OPTS = dict(device="cpu", reattn_chunk_size=16, chunked_prefill_size=64, log_level="warning")


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_restart_reuses_stored_prefix(tmp_path, tiny_llama):
    doc = _ids(900, 1)  # beyond the tiny model's 512 trained positions: ReAttention selects
    store = str(tmp_path / "store")
    with Engine(tiny_llama, **OPTS) as plain:
        want = plain.generate(input_ids=doc + _ids(5, 3), sampling_params=GREEDY)["output_ids"]
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as first:
        first.generate(input_ids=doc + _ids(5, 2), sampling_params=GREEDY)
        first.store_tier.flush()
        assert first.stats()["store_chunks_written"] >= 900 // 16
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as second:  # a "restart"
        out = second.generate(input_ids=doc + _ids(5, 3), sampling_params=GREEDY)
        assert out["meta_info"]["cached_tokens"] >= 0.95 * (900 // 16 * 16)
        assert second.stats()["store_chunks_loaded"] >= 900 // 16 - 1
    assert out["output_ids"] == want


def test_store_of_another_model_is_refused(tmp_path, tiny_llama):
    store = str(tmp_path / "store")
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:
        eng.generate(input_ids=_ids(40, 4), sampling_params=GREEDY)
    other = make_tiny_model(str(tmp_path / "other"), "llama", seed=99)
    with pytest.raises(ModelMismatch, match="weights_hash"):
        Engine(other, kv_store_path=store, **OPTS)


def test_corrupt_block_is_detected_recomputed_and_answers_stay(tmp_path, tiny_llama):
    from sglang_reattn.kv_store import chunk_hashes
    from sglang_reattn.testing import flip_kv_byte

    doc = _ids(400, 7)
    store = str(tmp_path / "store")
    with Engine(tiny_llama, **OPTS) as plain:
        want = plain.generate(input_ids=doc + _ids(5, 8), sampling_params=GREEDY)["output_ids"]
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as first:
        first.generate(input_ids=doc, sampling_params=GREEDY)
        first.store_tier.flush()
    # Flip a byte inside layer 1's KV block of the 10th chunk, behind the store's back.
    bad = chunk_hashes(doc, 16)[9]
    flip_kv_byte(store, bad, 1)
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as second:
        out = second.generate(input_ids=doc + _ids(5, 8), sampling_params=GREEDY)
        stats = second.stats()
        assert stats["store_corrupt_blocks"] == 1
        # Chunks before the bad one came from the store; the rest were recomputed.
        assert out["meta_info"]["cached_tokens"] == 9 * 16
        assert out["output_ids"] == want
        second.store_tier.flush()
        assert second.store_tier.store.has_many([bad]) == [True]  # published again


def test_ingest_cli_names_a_reusable_context(tmp_path, tiny_llama, capsys):
    from sglang_reattn.ingest import main as ingest
    from sglang_reattn.kv_store import ChunkStore

    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 12345. " + "The grass is green. The sky is blue. " * 60)
    store = str(tmp_path / "store")
    flags = ["--model-path", tiny_llama, "--kv-store-path", store, "--device", "cpu",
             "--reattn-chunk-size", "16", "--chunked-prefill-size", "64",
             "--log-level", "warning"]
    assert ingest([str(doc), "--name", "grass", "--pin"] + flags) == 0
    with ChunkStore(store, None, readonly=True) as s:
        ctx = {c.name: c for c in s.list_contexts()}["grass"]
        assert ctx.pinned and ctx.token_count >= 16 * 20
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:
        ids = eng.tokenizer.encode(doc.read_text())
        out = eng.generate(input_ids=ids + _ids(4, 9), sampling_params=GREEDY)
        assert out["meta_info"]["cached_tokens"] >= 0.95 * (len(ids) // 16 * 16)
    assert ingest([str(tmp_path / "missing.txt"), "--name", "x"] + flags) == 2
    assert "cannot read" in capsys.readouterr().err


def test_named_context_api(tmp_path, tiny_llama):
    from sglang_reattn.errors import InvalidRequest

    doc, question = _ids(300, 11), _ids(6, 12)
    with Engine(tiny_llama, **OPTS) as plain:
        want = plain.generate(input_ids=doc + question, sampling_params=GREEDY)["output_ids"]
    store = str(tmp_path / "store")
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:
        info = eng.ingest("doc", input_ids=doc, namespace="tenant-a")
        assert info["tokens"] == 300 and info["stored_tokens"] == 288
        assert not info["pinned"] and info["bytes"] > 0
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:  # another server run
        assert [c["name"] for c in eng.list_contexts()] == ["doc"]
        assert eng.pin_context("doc")["pinned"]
        out = eng.generate(input_ids=question, sampling_params=GREEDY, context="doc")
        assert out["output_ids"] == want
        assert out["meta_info"]["cached_tokens"] == 288
        with pytest.raises(InvalidRequest, match="unknown context"):
            eng.generate(input_ids=question, context="nope")
        eng.delete_context("doc")
        assert eng.list_contexts() == []
    with Engine(tiny_llama, **OPTS) as no_store:
        with pytest.raises(InvalidRequest, match="--kv-store-path"):
            no_store.list_contexts()


def test_named_context_chain_is_read_once_and_its_ids_not_hashed_again(tmp_path, tiny_llama,
                                                                      monkeypatch):
    """A request on a named context takes the context's stored chunk ids as its own
    first ones (only the question's chunks are hashed); the context's chain is read from
    the store once and kept until a chunk leaves the store; the answer stays the one
    without a store."""
    from sglang_reattn.engine import scheduler
    from sglang_reattn.kv_store import ChunkStore

    doc, question = _ids(300, 21), _ids(40, 22)
    with Engine(tiny_llama, **OPTS) as plain:
        want = plain.generate(input_ids=doc + question, sampling_params=GREEDY)["output_ids"]
    store = str(tmp_path / "store")
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:
        eng.ingest("doc", input_ids=doc)
    hashed, reads = [], []
    real_hashes, real_chain = scheduler.chunk_hashes, ChunkStore.chain
    monkeypatch.setattr(scheduler, "chunk_hashes",
                        lambda toks, *a: hashed.append(len(toks)) or real_hashes(toks, *a))
    monkeypatch.setattr(ChunkStore, "chain",
                        lambda self, last: reads.append(last) or real_chain(self, last))
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:
        for cached in (288, 336):  # the second also finds the first's question chunks
            out = eng.generate(input_ids=question, sampling_params=GREEDY, context="doc")
            assert out["output_ids"] == want and out["meta_info"]["cached_tokens"] == cached
        assert len(reads) == 1  # the second request took the kept chain
        # the 18 stored chunks came with the context: hashed, only what follows them
        assert hashed and all(n < 288 for n in hashed)
        # kept chains are bounded in tokens: a second context's pushes the first out
        from sglang_reattn.engine import contexts

        monkeypatch.setattr(contexts, "CHAIN_CACHE_TOKENS", 400)
        eng.ingest("doc2", input_ids=_ids(300, 23))
        reads.clear()
        for name in ("doc2", "doc", "doc"):
            eng.generate(input_ids=question, sampling_params=GREEDY, context=name)
        assert len(reads) == 2  # doc2, then doc again (288 + 288 tokens > 400), then kept
        eng.store_tier.store.delete(eng.store_tier.store.get_context("doc").last_chunk_id)
        reads.clear()
        with pytest.raises(Exception, match="incomplete"):  # the record was cut back
            eng.generate(input_ids=question, sampling_params=GREEDY, context="doc")


def test_last_used_marks_wait_for_an_idle_engine(tmp_path, monkeypatch):
    """Touches (LRU bookkeeping of loaded chunks) are held back while the engine is busy,
    handed to the writer once it is idle, or once the oldest waited TOUCH_DEFER_S."""
    from sglang_reattn.engine import store_tier
    from sglang_reattn.kv_store import synthetic
    from sglang_reattn.layers.attention import KVPool

    pool = KVPool(2, 4, 8, 1, 8, torch.float16, torch.device("cpu"))
    fp = synthetic.tiny_fingerprint(chunk_size=8)
    tier = store_tier.StoreTier(str(tmp_path / "s"), fp, "64MiB", "raw", pool, lambda p: None)
    sent = []
    real_put = tier._q.put
    monkeypatch.setattr(tier._q, "put", lambda item: sent.append(item))
    tier.idle_work(busy=True)
    tier.touch(["a", "b"])
    tier.touch(["c"])
    tier.idle_work(busy=True)
    assert sent == []  # busy, and the first mark is fresh
    tier.idle_work(busy=False)
    assert [(kind, ids) for kind, (ids, _) in sent] == [("touch", ["a", "b", "c"])]
    monkeypatch.setattr(store_tier, "TOUCH_DEFER_S", 0.0)
    tier.idle_work(busy=True)
    tier.touch(["d"])  # busy, but held back longer than the bound (0 s)
    assert sent[-1][1][0] == ["d"]
    # the writer marks each chunk once, and none again within TOUCH_REFRESH_S
    assert tier._fresh_marks(["a", "b", "c"]) == ["a", "b", "c"]
    tier._marked(["a", "b", "c"])
    assert tier._fresh_marks(["e", "a", "e", "f"]) == ["e", "f"]
    assert tier._fresh_marks(["a"]) == []
    monkeypatch.setattr(store_tier, "TOUCH_REFRESH_S", 0.0)
    assert tier._fresh_marks(["a", "a"]) == ["a"]
    monkeypatch.setattr(tier._q, "put", real_put)
    tier.close()


def test_marks_handed_over_wait_again_once_the_engine_is_busy(tmp_path, monkeypatch):
    """The writer writes marks handed over at an idle point a batch per transaction; once
    the engine is busy again the rest wait for its next idle point (within TOUCH_DEFER_S
    of the oldest), then are written, each chunk once."""
    from sglang_reattn.engine import store_tier
    from sglang_reattn.kv_store import synthetic
    from sglang_reattn.layers.attention import KVPool

    monkeypatch.setattr(store_tier, "TOUCH_BATCH", 2)
    pool = KVPool(2, 4, 8, 1, 8, torch.float16, torch.device("cpu"))
    fp = synthetic.tiny_fingerprint(chunk_size=8)
    tier = store_tier.StoreTier(str(tmp_path / "s"), fp, "64MiB", "raw", pool, lambda p: None)
    ids = [r.chunk_id for r in synthetic.make_chain(fp, 5)]
    tier.store.put_chunks(synthetic.make_chain(fp, 5))
    batches = []
    real_touch = tier.store.touch
    monkeypatch.setattr(tier.store, "touch", lambda b, *a: (batches.append(list(b)),
                                                            real_touch(b, *a))[1])
    tier.touch(ids)  # idle: handed over, written whole
    tier.flush()
    assert batches == [ids[:2], ids[2:4], ids[4:]]
    monkeypatch.setattr(store_tier, "TOUCH_REFRESH_S", 0.0)
    batches.clear()
    sent = []
    real_put = tier._q.put
    monkeypatch.setattr(tier._q, "put", sent.append)  # (the writer's work done here)
    tier.touch(ids)  # handed over at the idle point; the engine is busy from then on
    tier.idle_work(busy=True)
    tier._write_marks(*sent.pop()[1])
    assert batches == [ids[:2]] and tier._touch_buf == ids[2:]
    tier.idle_work(busy=True)  # still busy and within the bound: nothing handed over
    assert sent == []
    monkeypatch.setattr(tier._q, "put", real_put)
    tier.flush()  # the next idle point
    assert batches == [ids[:2], ids[2:4], ids[4:]] and tier._touch_buf == []
    assert tier.stats["store_touched_chunks"] == 10
    monkeypatch.setattr(store_tier, "TOUCH_DEFER_S", 0.0)  # past the bound: all at once
    batches.clear()
    tier.touch(ids)
    tier.idle_work(busy=True)
    tier.flush()
    assert batches == [ids[:2], ids[2:4], ids[4:]]
    tier.close()


def test_read_layers_reads_ahead_in_order_and_raises_in_order(tmp_path):
    """Layers read ahead on reader threads come back in layer order, equal to plain reads;
    a corrupt block surfaces when its layer is reached, after the layers before it."""
    from sglang_reattn.engine.store_tier import StoreTier
    from sglang_reattn.kv_store import CorruptBlock, synthetic
    from sglang_reattn.layers.attention import KVPool
    from sglang_reattn.testing import flip_kv_byte

    fp = synthetic.tiny_fingerprint(num_layers=6, num_kv_heads=2, head_dim=8, chunk_size=4)
    pool = KVPool(6, 4, 4, 2, 8, torch.float16, torch.device("cpu"))
    path = str(tmp_path / "s")
    tier = StoreTier(path, fp, "64MiB", "raw", pool, lambda p: None)
    recs = synthetic.make_chain(fp, 5, seed=2)
    tier.store.put_chunks(recs)
    ids = [r.chunk_id for r in recs]
    got = list(tier.read_layers(ids))
    assert [layer for layer, _ in got] == list(range(6))
    for layer, kv in got:
        want_k, want_v = tier.store.get_kv_many(ids, layer)
        assert (kv[:, 0] == want_k).all() and (kv[:, 1] == want_v).all()
    tier.close()
    flip_kv_byte(path, ids[2], 3)
    tier = StoreTier(path, fp, "64MiB", "raw", pool, lambda p: None)
    seen = []
    with pytest.raises(CorruptBlock) as e:
        for layer, _ in tier.read_layers(ids):
            seen.append(layer)
    assert seen == [0, 1, 2] and e.value.chunk_id == ids[2]
    tier.close()



def test_reads_go_over_the_reader_threads_only_while_they_hit_the_disk(synthetic_store_tier,
                                                                      monkeypatch):
    """A bulk read that took major page faults marks the tier cold: the next reads are
    split over the reader threads (a layer's chunks) or read ahead on them (a load's
    layers); one that took none marks it warm, and reads stay on the calling thread.
    Either way the blocks are the same."""
    from sglang_reattn.engine import store_tier

    faults = iter(range(0, 10 ** 6, 7))  # every call: more faults than the last
    monkeypatch.setattr(store_tier, "major_faults", lambda: next(faults))
    tier, ids = synthetic_store_tier(3, 4, 12, 5)
    want = tier.store.get_kv_many(ids, 2)
    submitted = []
    pool_ = tier._reader_pool()
    real_submit = pool_.submit
    monkeypatch.setattr(pool_, "submit", lambda *a: submitted.append(a) or real_submit(*a))

    assert tier.cold
    k, v = tier.get_kv(ids, 2)  # cold: split into 12 // SPLIT_MIN parts
    assert len(submitted) == 12 // store_tier.SPLIT_MIN and tier.cold
    assert (k == want[0]).all() and (v == want[1]).all()

    monkeypatch.setattr(store_tier, "major_faults", lambda: 0)  # from now on: no faults
    tier.get_kv(ids, 2)  # still split (cold), and it took no faults: warm now
    assert not tier.cold
    submitted.clear()
    k, v = tier.get_kv(ids, 2)
    assert not submitted and (k == want[0]).all() and (v == want[1]).all()
    got = list(tier.read_layers(ids))
    assert not submitted and [layer for layer, _ in got] == [0, 1, 2]
    assert (got[2][1][:, 0] == want[0]).all() and (got[2][1][:, 1] == want[1]).all()
    assert tier.get_kv(ids, 2, split=True) and len(submitted) > 1  # forced


def test_lookup_finds_the_stored_prefix_of_a_chain_in_a_few_reads(synthetic_store_tier,
                                                                 monkeypatch):
    """What the store holds of a chain is a prefix of it (a chunk is published after its
    parent, removed with its subtree): lookup finds it by bisection, from any start and
    up to any stop, and stops before a chunk this tier found corrupt."""
    from sglang_reattn.kv_store import synthetic

    tier, ids = synthetic_store_tier(2, 4, 40, 8)
    more = [r.chunk_id for r in synthetic.make_chain(tier.store.fingerprint, 20, seed=9,
                                                     parent_id=ids[-1])]  # not stored
    chain = ids + more
    reads = []
    has = tier.store.has
    monkeypatch.setattr(tier.store, "has", lambda c: reads.append(c) or has(c))
    for start, stop in ((0, 60), (0, 40), (0, 39), (5, 60), (39, 60), (40, 60), (0, 1),
                        (7, 7)):
        reads.clear()
        assert tier.lookup(chain, start, stop) == ids[start:min(stop, 40)], (start, stop)
        assert len(reads) <= 7  # log2(60) + 1
    tier.store.delete(ids[30])  # and its subtree: the stored prefix is 30 chunks now
    assert tier.lookup(chain, 0, 60) == ids[:30]
    tier._bad.add(ids[12])
    assert tier.lookup(chain, 0, 60) == ids[:12] and tier.lookup(chain, 13, 60) == ids[13:30]


def test_a_load_takes_layers_read_ahead_and_their_errors(synthetic_store_tier):
    """load(ids, pages, read_ahead(ids)) fills the pages as a plain load does; a corrupt
    block met by the read ahead is reported as by a plain load (its chunk dropped, the
    chunks before it loaded)."""
    from sglang_reattn.testing import flip_kv_byte

    tier, ids = synthetic_store_tier(3, 16, 6, 4)
    pool = tier.pool
    assert tier.load(ids, list(range(1, 7))) == 6
    want_k, want_v = pool.k[:, 1:7].clone(), pool.v[:, 1:7].clone()
    pool.k.zero_()
    pool.v.zero_()
    assert tier.load(ids, list(range(8, 14)), tier.read_ahead(ids)) == 6
    assert torch.equal(pool.k[:, 8:14], want_k) and torch.equal(pool.v[:, 8:14], want_v)
    tier.close()
    flip_kv_byte(tier.store.path, ids[4], 2)
    from sglang_reattn.engine.store_tier import StoreTier

    tier = StoreTier(tier.store.path, tier.store.fingerprint, "64MiB", "raw", pool,
                     lambda p: None)
    assert tier.load(ids, list(range(1, 7)), tier.read_ahead(ids)) == 4
    assert tier.stats["store_corrupt_blocks"] == 1 and not tier.store.has(ids[4])
    tier.close()


@pytest.mark.parametrize("pin_bytes", [1 << 20, 3 * 4 * 2 * 2 * 4 * 8 * 2])
def test_reads_ahead_into_the_load_buffer_load_like_plain_reads(synthetic_store_tier,
                                                                monkeypatch, pin_bytes):
    """With the tier's load buffer (pinned on CUDA; here unpinned, on the CPU), loads read
    ahead into it fill the pages as plain loads do: one after another, after a read ahead
    that no load took (an admission that failed later), and one too large for the buffer
    (read into fresh arrays). The second size holds exactly 4 chunks of 3 layers."""
    from sglang_reattn.engine import store_tier

    monkeypatch.setattr(store_tier, "LOAD_BUFFER_OFF_CUDA", True)
    monkeypatch.setattr(store_tier, "LOAD_PIN_BYTES", pin_bytes)
    tier, ids = synthetic_store_tier(3, 24, 8, 9)
    pool = tier.pool
    assert tier._load_pin is not None and tier._load_pin.numel() * 2 == pin_bytes
    assert tier.load(ids, list(range(1, 9))) == 8
    want_k, want_v = pool.k[:, 1:9].clone(), pool.v[:, 1:9].clone()
    used = []
    for lo, hi in ((0, 4), (4, 8), (2, 6), (0, 8)):
        pool.k.zero_()
        pool.v.zero_()
        tier.read_ahead(ids[hi - 1:hi])  # (taken by no load: overwritten after it ends)
        ahead = tier.read_ahead(ids[lo:hi])
        pinned = ahead.result()[0]
        used.append(pinned is not None)
        if pinned is not None:
            assert pinned.data_ptr() == tier._load_pin.data_ptr()
        assert tier.load(ids[lo:hi], list(range(10, 10 + hi - lo)), ahead) == hi - lo
        assert torch.equal(pool.k[:, 10:10 + hi - lo], want_k[:, lo:hi])
        assert torch.equal(pool.v[:, 10:10 + hi - lo], want_v[:, lo:hi])
    assert used == [True, True, True, pin_bytes > 3 * 8 * 2 * 2 * 4 * 8 * 2]
