"""ChunkStore API: round trips for every codec and dtype, headers, contexts, pins, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sglang_reattn.kv_store import (
    CODECS,
    ChunkNotFound,
    ChunkRecord,
    ChunkStore,
    ModelMismatch,
    StoreError,
    chunk_hashes,
    codecs,
)
from sglang_reattn.kv_store.synthetic import (
    gaussian_kv,
    kv_for,
    make_chain,
    summary_for,
    tiny_fingerprint,
)

DTYPES = ["float16", "bfloat16", "float32", "float8_e4m3fn"]
GB = 1 << 30


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_codec_roundtrip(codec, dtype):
    a = gaussian_kv(np.random.default_rng(0), (2, 64, 4, 128), dtype)
    raw = a.tobytes()
    block = codecs.encode_block(raw, codec, 3, a.itemsize)
    assert codecs.decode_block(block, "x", 0, "kv") == raw
    if codec != "raw" and dtype in ("float16", "bfloat16"):
        assert len(block) < len(raw)  # Gaussian 2-byte data does compress


def test_planes_split_high_byte_first():
    a = np.array([0x1234, 0xABCD], dtype="<u2")
    assert codecs.split_planes(a.tobytes(), 2) == bytes([0x12, 0xAB, 0x34, 0xCD])
    b = np.arange(10, dtype="<u4")
    assert codecs.join_planes(codecs.split_planes(b.tobytes(), 4), 4) == b.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_store_roundtrip(tmp_path, codec, dtype):
    fp = tiny_fingerprint(num_layers=3, num_kv_heads=2, head_dim=16, chunk_size=8, dtype=dtype)
    recs = make_chain(fp, 6, seed=1)
    with ChunkStore(tmp_path / "s", fp, GB, codec=codec) as s:
        assert s.put_chunks(recs) == [r.chunk_id for r in recs]
        assert s.put_chunks(recs[:2]) == []  # already there: only touched
    with ChunkStore(tmp_path / "s", fp, readonly=True) as s:  # reopen, reader
        assert s.codec == codec and s.stats()["chunks"] == 6
        for r in recs:
            for layer in range(3):
                k, v = s.get_kv(r.chunk_id, layer)
                assert k.shape == (8, 2, 16) and k.dtype == s.np_dtype
                assert k.tobytes() == np.asarray(r.k[layer]).tobytes()
                assert v.tobytes() == np.asarray(r.v[layer]).tobytes()
        ids = [r.chunk_id for r in recs]
        K, _ = s.get_kv_many(ids[::-1], 2)
        assert K.shape == (6, 8, 2, 16)
        assert all(K[i].tobytes() == recs[5 - i].k[2].tobytes() for i in range(6))
        summ = s.get_summaries(ids)
        want = np.stack([r.summary for r in recs])
        assert summ.shape == want.shape == (6, 3, 2, 2, 16)
        # int8 with per-row scale: error at most half a step of each row
        step = np.abs(want).max(axis=-1, keepdims=True) / 127
        assert np.all(np.abs(summ - want) <= step / 2 + 1e-6)
        q, scales = s.get_summaries(ids[:2], dequantize=False)
        assert q.dtype == np.int8 and scales.shape == (2, 3, 2, 2)


def test_bf16_is_uint16_bits(tmp_path):
    fp = tiny_fingerprint(dtype="torch.bfloat16")
    rec = make_chain(fp, 1)[0]
    with ChunkStore(tmp_path, fp, GB) as s:
        s.put_chunks([rec._replace(k=rec.k.view(np.int16), v=rec.v.view(np.float16))])
        k, v = s.get_kv(rec.chunk_id, 0)
        assert k.dtype == np.uint16 and np.array_equal(k, rec.k[0]) and np.array_equal(v, rec.v[0])


def test_headers_and_iteration(tmp_path):
    fp = tiny_fingerprint()
    a = make_chain(fp, 5, seed=1)
    b = make_chain(fp, 3, seed=2, namespace="tenant")
    with ChunkStore(tmp_path, fp, GB) as s:
        s.put_chunks(a + b)
        h = s.get_header(a[3].chunk_id)
        assert h.parent_id == a[2].chunk_id and h.namespace == "" and h.pin_count == 0
        assert list(h.token_ids) == list(a[3].token_ids) and len(h.kv_crcs) == 2
        assert s.get_header(b[0].chunk_id).parent_id is None
        assert s.get_header(b[0].chunk_id).namespace == "tenant"
        got = {h.chunk_id: h for h in s.iter_headers(batch=3)}
        assert set(got) == {r.chunk_id for r in a + b}
        assert s.has(a[0].chunk_id) and not s.has("00" * 32)
        assert s.has_many([a[0].chunk_id, "11" * 32]) == [True, False]
        with pytest.raises(ChunkNotFound):
            s.get_header("22" * 32)
        with pytest.raises(ChunkNotFound):
            s.get_kv("22" * 32, 0)
        before = s.get_header(a[0].chunk_id).last_used
        assert s.touch([a[0].chunk_id, "33" * 32]) == 1
        assert s.get_header(a[0].chunk_id).last_used >= before


def test_chain_reads_ids_and_tokens_root_first(tmp_path):
    """chain(last) walks the parent links in one read: ids root first, the chunks' tokens
    concatenated (as int64, wide ids too); a damaged header or a missing chunk is named."""
    from sglang_reattn.kv_store import CorruptBlock

    fp = tiny_fingerprint()
    a = make_chain(fp, 5, seed=1)
    with ChunkStore(tmp_path, fp, GB) as s:
        s.put_chunks(a)
        ids, toks = s.chain(a[3].chunk_id)
        assert ids == [r.chunk_id for r in a[:4]] and toks.dtype == np.int64
        assert toks.tolist() == [t for r in a[:4] for t in r.token_ids]
        assert s.chain(a[0].chunk_id)[0] == [a[0].chunk_id]
        with pytest.raises(ChunkNotFound):
            s.chain("22" * 32)

        def damage(txn, key=bytes.fromhex(a[1].chunk_id)):
            v = bytearray(txn.get(key, db=s.dbs.headers))
            v[-1] ^= 0xFF
            txn.put(key, bytes(v), db=s.dbs.headers)

        s._write(damage)
        with pytest.raises(CorruptBlock) as e:
            s.chain(a[4].chunk_id)
        assert e.value.chunk_id == a[1].chunk_id
        assert s.chain(a[0].chunk_id)[0] == [a[0].chunk_id]  # the part below it is fine


def test_header_link_reads_what_decode_header_does():
    """header_link's parent and tokens, read from their places in the header's JSON,
    equal decode_header's: null and hex parents, wide tokens, namespaces that spell the
    fields it looks for."""
    import random

    from sglang_reattn.kv_store.records import (
        ChunkHeader,
        decode_header,
        encode_header,
        header_link,
    )

    rng = random.Random(0)
    for _ in range(500):
        wide = rng.random() < 0.3
        toks = [rng.randrange(2 ** 40 if wide else 50000) for _ in range(rng.randrange(1, 70))]
        parent = None if rng.random() < 0.2 else "%064x" % rng.getrandbits(256)
        ns = rng.choice(["", "tenant", '"w":true,', 'a\\"w\\":true', ',"w":false', '{"p":"x"'])
        h = ChunkHeader("ab", parent, ns, tuple(toks), 1.0, 2.0, 0, "raw", 0, 1, 1, (1, 2), 3,
                        (1, 2), b"\x01" * 16)
        value = encode_header(h)
        got_parent, got_toks = header_link("ab", value)
        want = decode_header("ab", value)
        assert got_parent == want.parent_id and got_toks.tolist() == list(want.token_ids)


def test_put_validation(tmp_path):
    fp = tiny_fingerprint()
    recs = make_chain(fp, 3)
    with ChunkStore(tmp_path, fp, GB) as s:
        with pytest.raises(ChunkNotFound, match="parent"):
            s.put_chunks(recs[1:])  # parent not in the store nor the batch
        with pytest.raises(ValueError, match="does not match"):
            s.put_chunks([recs[0]._replace(chunk_id="44" * 32)])
        with pytest.raises(ValueError, match="shape"):
            s.put_chunks([recs[0]._replace(k=[x[:10] for x in recs[0].k])])
        with pytest.raises(ValueError, match="dtype"):
            s.put_chunks([recs[0]._replace(k=recs[0].k.astype(np.float32))])
        with pytest.raises(ValueError, match="layers"):
            s.put_chunks([recs[0]._replace(v=recs[0].v[:1])])
        with pytest.raises(ValueError, match="summary shape"):
            s.put_chunks([recs[0]._replace(summary=recs[0].summary[:, :, :, :4])])
        other_ns = ChunkRecord(chunk_hashes(recs[1].token_ids, 64, prior_hash=recs[0].chunk_id)[0],
                               recs[0].chunk_id, "other", *recs[1][3:])
        s.put_chunks(recs[:1])
        with pytest.raises(ValueError, match="namespace"):
            s.put_chunks([other_ns])
        assert s.stats()["chunks"] == 1  # failed batches left nothing behind


def test_model_mismatch_names_fields(tmp_path):
    fp = tiny_fingerprint()
    ChunkStore(tmp_path, fp, GB).close()
    other = dict(fp, num_layers=32, dtype="bfloat16", rope={"type": "llama3", "theta": 5e5})
    with pytest.raises(ModelMismatch) as e:
        ChunkStore(tmp_path, other, GB)
    msg = str(e.value)
    assert "num_layers: store has 2, engine has 32" in msg
    assert "dtype: store has 'float16', engine has 'bfloat16'" in msg
    assert "rope" in msg and "llama3" in msg and "chunk_size" not in msg
    assert set(e.value.fields) == {"num_layers", "dtype", "rope"}
    with pytest.raises(ModelMismatch, match="extra: store has '<missing>', engine has 1"):
        ChunkStore(tmp_path, dict(fp, extra=1), GB)
    with pytest.raises(ValueError, match="missing required"):
        ChunkStore(tmp_path / "new", {"architecture": "x"}, GB)
    ChunkStore(tmp_path, fp, GB).close()  # the right model still opens


def test_contexts_and_pins(tmp_path):
    fp = tiny_fingerprint()
    a = make_chain(fp, 4)
    with ChunkStore(tmp_path, fp, GB) as s:
        s.put_chunks(a)
        ctx = s.put_context("doc", a[-1].chunk_id, 4 * 64 + 10, pinned=True)
        assert ctx.namespace == "" and ctx.pinned
        assert [s.get_header(r.chunk_id).pin_count for r in a] == [1, 1, 1, 1]
        s.put_context("doc", a[1].chunk_id, 128, pinned=True)  # replace: pins move
        assert [s.get_header(r.chunk_id).pin_count for r in a] == [1, 1, 0, 0]
        s.pin(a[3].chunk_id)
        assert [s.get_header(r.chunk_id).pin_count for r in a] == [2, 2, 1, 1]
        s.unpin(a[3].chunk_id)
        s.pin_context("doc", False)
        s.pin_context("doc", False)  # idempotent
        assert [s.get_header(r.chunk_id).pin_count for r in a] == [0, 0, 0, 0]
        with pytest.raises(ValueError, match="not pinned"):
            s.unpin(a[0].chunk_id)
        s.put_context("empty", None, 0, namespace="t", tail=[5, 6, 7])
        assert s.get_context("empty").tail == (5, 6, 7)  # a document under one chunk
        assert s.pin_context("empty", False).tail == (5, 6, 7)  # kept across updates
        assert s.get_context("doc").tail == ()
        assert [c.name for c in s.list_contexts()] == ["doc", "empty"]
        assert s.get_context("doc").token_count == 128
        s.pin_context("doc")
        s.delete_context("doc")
        assert s.get_header(a[0].chunk_id).pin_count == 0
        with pytest.raises(ChunkNotFound, match="context"):
            s.get_context("doc")
        with pytest.raises(ChunkNotFound):
            s.put_context("bad", "55" * 32, 64)


def test_context_records_without_tail_still_decode():
    from sglang_reattn.kv_store.records import ContextInfo, decode_context, encode_context

    old = b'{"name":"d","namespace":"","last_chunk_id":null,"token_count":0,"pinned":false,' \
          b'"created":1.0,"last_used":2.0,"lost_tokens":0}'
    assert decode_context(old).tail == ()
    info = ContextInfo("d", "", None, 0, False, 1.0, 2.0, tail=(1, 2))
    assert decode_context(encode_context(info)) == info


def test_delete_drops_descendants_and_cuts_contexts(tmp_path):
    fp = tiny_fingerprint()
    a = make_chain(fp, 6)
    branch = make_chain(fp, 2, seed=9, parent_id=a[2].chunk_id)
    with ChunkStore(tmp_path, fp, GB) as s:
        s.put_chunks(a + branch)
        s.put_context("doc", a[-1].chunk_id, 6 * 64, pinned=True)
        s.pin(branch[-1].chunk_id)
        used = s.stats()["bytes"]
        gone = s.delete(a[2].chunk_id, reason="test")
        assert set(gone) == {r.chunk_id for r in a[2:] + branch}
        assert not any(s.has_many(gone)) and s.has(a[1].chunk_id)
        assert s.stats()["chunks"] == 2 and s.stats()["bytes"] < used
        ctx = s.get_context("doc")
        assert ctx.last_chunk_id == a[1].chunk_id and ctx.token_count == 2 * 64
        assert ctx.lost_tokens == 4 * 64
        # the context still pins its (shorter) chain; the branch's own pin was released
        assert [s.get_header(r.chunk_id).pin_count for r in a[:2]] == [1, 1]
        assert s.delete(a[2].chunk_id) == []


def test_one_open_per_process_and_fork_guard(tmp_path):
    fp = tiny_fingerprint()
    with ChunkStore(tmp_path, fp, GB) as s:
        with pytest.raises(StoreError, match="already open in this process"):
            ChunkStore(tmp_path, fp, GB)
        pid = os.fork()
        if pid == 0:  # child: using the parent's store must fail, not corrupt it
            try:
                s.has("00" * 32)
                os._exit(1)
            except StoreError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        rec = make_chain(fp, 1)[0]
        s.put_chunks([rec])
    with ChunkStore(tmp_path, fp, readonly=True) as r:
        with pytest.raises(StoreError, match="readonly"):
            r.put_chunks([rec])
        assert np.array_equal(r.get_kv(rec.chunk_id, 1)[1], kv_for(rec.chunk_id, fp)[1][1])
        assert np.allclose(r.get_summaries([rec.chunk_id])[0], summary_for(rec.chunk_id, fp), atol=0.05)
    with pytest.raises(StoreError, match="no chunk store"):
        ChunkStore(tmp_path / "missing", fp, readonly=True)


def test_imports_nothing_else():
    """kv_store depends on numpy, lmdb and zstandard only (no torch, no engine)."""
    import subprocess
    import sys

    code = (
        "import sys, sglang_reattn.kv_store\n"
        "bad = [m for m in sys.modules if m == 'torch' or (m.startswith('sglang_reattn.')"
        " and not m.startswith('sglang_reattn.kv_store'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_summary_packs_read_like_single_summaries(tmp_path):
    """Summaries read through packs equal those read one by one, for any slice of the
    chain (starting inside a pack, ending inside one, other chunks between); a pack is
    written once, its bytes are charged, a damaged one is skipped (the chunks are read one
    by one) and rewritten, and removing any chunk of a pack removes the pack."""
    fp = tiny_fingerprint(num_layers=3, num_kv_heads=2, head_dim=16, chunk_size=8)
    recs = make_chain(fp, 40, seed=3)
    ids = [r.chunk_id for r in recs]
    with ChunkStore(tmp_path / "s", fp, GB) as s:
        s.put_chunks(recs)
        want_q, want_s = s.get_summaries(ids, dequantize=False)
        used = s.stats()["bytes"]
        assert s.pack_summaries(ids[0:16]) and s.pack_summaries(ids[16:32])
        assert not s.pack_summaries(ids[0:16])  # already there
        assert s.stats()["bytes"] > used and s.stats()["dbs"]["packs"]["entries"] == 2
        served = []  # chunks each read took from packs
        orig = s._pack_rows

        def counted(txn, keys, i, lead=None):
            got = orig(txn, keys, i, lead)
            served[-1] += 0 if got is None else len(got[0])
            return got

        s._pack_rows = counted
        # (lo, hi, pack_of_first, chunks read from packs): a run starting inside a pack is
        # read from it when told where it starts; a wrong or impossible row: one by one
        for lo, hi, lead, packed in [(0, 40, None, 32), (3, 40, None, 16), (0, 20, None, 20),
                                     (5, 29, None, 13), (16, 18, None, 2), (31, 33, None, 0),
                                     (39, 40, None, 0), (3, 40, (0, 3), 29),
                                     (18, 29, (16, 2), 11), (1, 3, (0, 1), 2),
                                     (3, 40, (0, 4), 16), (3, 20, (0, 40), 4),
                                     (17, 20, (0, 17), 0)]:
            served.append(0)
            q, sc = s.get_summaries(ids[lo:hi], dequantize=False,
                                    pack_of_first=lead and (ids[lead[0]], lead[1]))
            assert np.array_equal(q, want_q[lo:hi]) and np.array_equal(sc, want_s[lo:hi])
            assert served[-1] == packed, (lo, hi, lead)
        s._pack_rows = orig
        assert np.allclose(s.get_summaries(ids), np.stack([r.summary for r in recs]), atol=0.05)
        # chunks in another order than the pack's: read one by one, still right
        mixed = ids[16:20][::-1] + ids[:3]
        q, _ = s.get_summaries(mixed, dequantize=False)
        assert np.array_equal(q, want_q[[19, 18, 17, 16, 0, 1, 2]])
        # a damaged pack: skipped, the same answer; pack_summaries writes it again
        def flip(txn, key, at):
            v = bytearray(txn.get(key, db=s.dbs.packs))
            v[at] ^= 0xFF
            txn.put(key, bytes(v), db=s.dbs.packs)

        # damaged rows, checked on the threads and in the first pack (which fixes the
        # framing), and a damaged count of chunks (read before any checksum)
        for first, at in ((16, -3), (0, -3), (16, codecs.FRAME_SIZE + 2)):
            s._write(lambda txn: flip(txn, bytes.fromhex(ids[first]), at))
            seen = {}  # the packs met, and whether each was intact
            assert np.array_equal(s.get_summaries(ids, dequantize=False, packs_seen=seen)[0],
                                  want_q)
            other = bytes.fromhex(ids[16 - first])
            assert seen == ({bytes.fromhex(ids[first]): False, other: True} if at < 0 else
                            {other: True})  # (a damaged count: no pack found there)
            assert s.pack_summaries(ids[first:first + 16])
            assert not s.pack_summaries(ids[first:first + 16])
        # removing a chunk removes its pack and its charge; the other pack stays
        before = s.stats()["bytes"]
        s.delete(ids[30])  # the second pack's chunk (and its descendants)
        assert s.stats()["dbs"]["packs"]["entries"] == 1
        assert s.stats()["bytes"] < before
        q, _ = s.get_summaries(ids[:30], dequantize=False)
        assert np.array_equal(q, want_q[:30])
        with pytest.raises(ChunkNotFound):
            s.pack_summaries(ids[24:40])
    # over the capacity a pack is not written (it evicts nothing)
    with ChunkStore(tmp_path / "t", fp, GB) as s:
        s.put_chunks(recs)
        used = s.stats()["bytes"]
    with ChunkStore(tmp_path / "t", fp, used + 100) as s:
        assert not s.pack_summaries(ids[0:16]) and s.stats()["chunks"] == 40


def test_kv_reads_split_over_threads_equal_plain_reads(tmp_path, monkeypatch):
    """Blocks big enough to be checked and copied in parts on threads: the same arrays as
    one part, for every codec, and a damaged block in a later part raises CorruptBlock
    naming that chunk."""
    from sglang_reattn.kv_store import CorruptBlock
    from sglang_reattn.kv_store import store as store_mod

    fp = tiny_fingerprint(num_layers=2, num_kv_heads=2, head_dim=64, chunk_size=64,
                          dtype="bfloat16")  # 32 KiB blocks
    recs = make_chain(fp, 40, seed=5)
    ids = [r.chunk_id for r in recs]
    for codec in CODECS:
        with ChunkStore(tmp_path / codec, fp, GB, codec=codec) as s:
            s.put_chunks(recs)
            got = {}
            for parts in (1, 4):
                monkeypatch.setattr(store_mod, "KV_PARTS", parts)
                got[parts] = s.get_kv_many(ids[::-1], 1)[0].copy()
            assert np.array_equal(got[1], got[4])
            assert np.array_equal(got[4][0], kv_for(ids[-1], fp)[0][1])
            assert s._workers is not None  # the parts did run on the threads

            def damage(txn):
                key = bytes.fromhex(ids[33]) + (1).to_bytes(2, "big")
                v = bytearray(txn.get(key, db=s.dbs.kv))
                v[-1] ^= 0xFF
                txn.put(key, bytes(v), db=s.dbs.kv)

            s._write(damage)
            with pytest.raises(CorruptBlock) as e:
                s.get_kv_many(ids, 1)
            assert e.value.chunk_id == ids[33]


_M64 = (1 << 64) - 1


def _splitmix(i: int) -> int:
    z = i * 0x9E3779B97F4A7C15 & _M64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
    return z ^ (z >> 31)


def _mix_reference(body: bytes) -> int:
    """The `mix` check as codecs.py's comment defines it, in Python integers."""
    head, payload = int.from_bytes(body[:8], "little"), body[8:]
    s = head * 0x9E3779B97F4A7C15 + len(payload) * 0xC2B2AE3D27D4EB4F
    padded = payload + bytes(-len(payload) % 8)
    for i in range(len(padded) // 8):
        s += int.from_bytes(padded[8 * i: 8 * i + 8], "little") * (_splitmix(i + 1) | 1)
    s &= _M64
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        s ^= s >> 33
        s = s * mult & _M64
    return (s ^ (s >> 33)) & 0xFFFFFFFF


def test_mix_check_matches_its_definition():
    """One block (any length, the weight table grown past its first size) and runs of
    blocks in one pass give the check the definition gives, on fresh random bytes."""
    rng = np.random.default_rng()
    for n in (8, 9, 15, 16, 100, 8 * 9000 + 8 + 5):
        body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert codecs.mix_check(body) == _mix_reference(body), n
    rows = rng.integers(0, 256, (7, 48 << 10), dtype=np.uint8)
    heads = rng.integers(0, 1 << 63, 7, dtype=np.uint64)
    want = [_mix_reference(int(h).to_bytes(8, "little") + r.tobytes())
            for h, r in zip(heads, rows)]
    assert codecs.mix_checks(rows, heads).tolist() == want
    # the temporary bounded to fewer rows than a run
    assert codecs.mix_checks(rows[:, :1 << 19 >> 3], heads).tolist() == [
        _mix_reference(int(h).to_bytes(8, "little") + r[:1 << 16].tobytes())
        for h, r in zip(heads, rows)]


@pytest.mark.parametrize("codec", CODECS)
def test_mix_check_catches_damage(codec):
    """A flipped bit anywhere in a block (frame or payload) fails its check; blocks of
    either check kind decode to the same bytes."""
    from sglang_reattn.kv_store import CorruptBlock

    rng = np.random.default_rng()
    raw = gaussian_kv(rng, (2, 64, 2, 32), "bfloat16").tobytes()
    for check in (codecs.CHECK_MIX, codecs.CHECK_CRC32):
        block = codecs.encode_block(raw, codec, 3, 2, check=check)
        assert codecs.decode_block(block, "x", 0, "kv") == raw
    block = codecs.encode_block(raw, codec, 3, 2)
    assert int.from_bytes(block[6:8], "little") == codecs.CHECK_MIX  # the default
    for at in [0, 4, 6, 8, len(block) - 1] + rng.integers(0, len(block), 200).tolist():
        bad = bytearray(block)
        bad[at] ^= 1 << int(rng.integers(8))
        with pytest.raises(CorruptBlock):
            codecs.decode_block(bytes(bad), "x", 0, "kv")


def test_bulk_checked_reads_name_the_first_damaged_chunk(tmp_path, monkeypatch):
    """get_kv_many over blocks of both check kinds (runs of `mix` blocks checked in one
    pass, CRC-32 blocks one at a time; a read of `mix` blocks only) returns the stored
    arrays; with damaged blocks it
    raises CorruptBlock naming the first one in the order asked, whichever kinds are
    damaged, with its reads split over threads or not."""
    from sglang_reattn.kv_store import CorruptBlock
    from sglang_reattn.kv_store import store as store_mod

    fp = tiny_fingerprint(num_layers=2, num_kv_heads=2, head_dim=64, chunk_size=64,
                          dtype="bfloat16")
    recs = make_chain(fp, 24, seed=9)
    ids = [r.chunk_id for r in recs]
    with ChunkStore(tmp_path / "s", fp, GB, codec="raw") as s:
        for a in range(0, 24, 6):  # CRC-32 and mix blocks in turn, 6 chunks each
            monkeypatch.setattr(codecs, "WRITE_CHECK", (a // 6) % 2)
            s.put_chunks(recs[a:a + 6])
        monkeypatch.setattr(codecs, "WRITE_CHECK", codecs.CHECK_MIX)
        order = ids[::-1]
        for parts in (1, 3):
            monkeypatch.setattr(store_mod, "KV_PARTS", parts)
            k, v = s.get_kv_many(order, 1)
            for j, cid in enumerate(order):
                want_k, want_v = kv_for(cid, fp)
                assert np.array_equal(k[j], want_k[1]) and np.array_equal(v[j], want_v[1])

        def damage(i):
            def fn(txn):
                key = bytes.fromhex(ids[i]) + (1).to_bytes(2, "big")
                v = bytearray(txn.get(key, db=s.dbs.kv))
                v[codecs.FRAME_SIZE + int(np.random.default_rng().integers(len(v) - 12))] ^= 4
                txn.put(key, bytes(v), db=s.dbs.kv)
            s._write(fn)

        damage(20)  # a mix block (chunks 18-23)
        damage(3)   # a CRC-32 block
        damage(8)   # a mix block

        def damage_frame(i, at):  # a byte of the frame's head, which the check covers
            key = bytes.fromhex(ids[i]) + (1).to_bytes(2, "big")
            s._write(lambda txn: txn.put(key, bytes(
                b ^ (8 if j == at else 0)
                for j, b in enumerate(txn.get(key, db=s.dbs.kv))), db=s.dbs.kv))

        damage_frame(22, 5)  # its itemsize byte: still a raw frame with a mix check
        # reads of mix blocks only (one run: one check pass) among the others
        mixed = ids[9:12] + ids[18:20]
        k, v = s.get_kv_many(mixed, 1)
        for j, cid in enumerate(mixed):
            want_k, want_v = kv_for(cid, fp)
            assert np.array_equal(k[j], want_k[1]) and np.array_equal(v[j], want_v[1])
        for parts in (1, 3):
            monkeypatch.setattr(store_mod, "KV_PARTS", parts)
            for asked, first in ((ids, 3), (ids[::-1], 22), (ids[6:], 8), (ids[4:8], None),
                                 (ids[6:12][::-1], 8), (ids[18:], 20), (ids[21:], 22),
                                 (mixed, None)):
                if first is None:
                    s.get_kv_many(asked, 1)
                    continue
                with pytest.raises(CorruptBlock) as e:
                    s.get_kv_many(asked, 1)
                assert e.value.chunk_id == ids[first]


def test_format_2_store_is_read_and_marked_3_by_a_writer(tmp_path):
    """A format-2 store (CRC-32 blocks only) opens: a reader leaves its format alone, a
    writer marks it 3 (format-2 code would take `mix` blocks for damage); an unknown format
    is refused."""
    from sglang_reattn.kv_store import store as store_mod

    fp = tiny_fingerprint()
    recs = make_chain(fp, 4, seed=2)

    def set_version(s, v):
        s._write(lambda txn: txn.put(b"format_version", v, db=s.dbs.meta))

    def version(path):
        with ChunkStore(path, None, readonly=True) as s:
            return s._load_meta()[b"format_version"]

    codecs_check = codecs.WRITE_CHECK
    codecs.WRITE_CHECK = codecs.CHECK_CRC32
    try:
        with ChunkStore(tmp_path / "s", fp, GB) as s:
            s.put_chunks(recs)
            set_version(s, b"2")
    finally:
        codecs.WRITE_CHECK = codecs_check
    assert version(tmp_path / "s") == b"2"
    with ChunkStore(tmp_path / "s", fp, readonly=True) as s:
        assert np.array_equal(s.get_kv(recs[1].chunk_id, 0)[0], recs[1].k[0])
    assert version(tmp_path / "s") == b"2"
    with ChunkStore(tmp_path / "s", fp) as s:
        assert np.array_equal(s.get_kv(recs[2].chunk_id, 1)[1], recs[2].v[1])
    assert version(tmp_path / "s") == b"3"
    with ChunkStore(tmp_path / "s", fp) as s:
        set_version(s, b"1")
    assert store_mod.FORMAT_VERSION == 3
    with pytest.raises(StoreError, match="store format 1"):
        ChunkStore(tmp_path / "s", fp)


def test_summaries_read_into_given_buffers(tmp_path):
    """get_summaries(out=...) writes into the arrays given (views of bigger buffers, as the
    streaming tier's pinned ones) and returns them, equal to a plain read, packs or not; a
    buffer of another shape, dtype or layout is refused with StoreError."""
    fp = tiny_fingerprint(num_layers=3, num_kv_heads=2, head_dim=16, chunk_size=8)
    recs = make_chain(fp, 20, seed=4)
    ids = [r.chunk_id for r in recs]
    with ChunkStore(tmp_path / "s", fp, GB) as s:
        s.put_chunks(recs)
        s.pack_summaries(ids[:8])
        want_q, want_s = s.get_summaries(ids, dequantize=False)
        big_q = np.full((32,) + want_q.shape[1:], 99, np.int8)
        big_s = np.full((32,) + want_s.shape[1:], -1.0, np.float32)
        for lo, hi in ((0, 20), (3, 11), (12, 13)):
            big_q[:] = 99
            q, sc = s.get_summaries(ids[lo:hi], dequantize=False,
                                    out=(big_q[:hi - lo], big_s[:hi - lo]))
            assert np.shares_memory(q, big_q) and np.shares_memory(sc, big_s)
            assert np.array_equal(big_q[:hi - lo], want_q[lo:hi])
            assert np.array_equal(big_s[:hi - lo], want_s[lo:hi])
            assert (big_q[hi - lo:] == 99).all()  # (nothing past the rows asked)
        for bad in ((big_q[:4, :2], big_s[:4]), (big_q[:4].astype(np.int16), big_s[:4]),
                    (big_q[:4], big_s[:4].astype(np.float64)), (big_q[:8:2], big_s[:4])):
            with pytest.raises(StoreError, match="buffers given"):
                s.get_summaries(ids[:4], dequantize=False, out=bad)
