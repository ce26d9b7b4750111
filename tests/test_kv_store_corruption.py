"""A flipped byte in any stored block is caught on read, and delete() drops the chunk."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
from sglang_reattn.kv_store import ChunkStore, CorruptBlock
from sglang_reattn.kv_store.synthetic import make_chain, tiny_fingerprint

GB = 1 << 30


def flip_byte(path, db_name: bytes, key: bytes, offset: int) -> None:
    """Corrupt one stored value behind the store's back, with a raw LMDB write."""
    env = lmdb.open(str(path), max_dbs=16)
    db = env.open_db(db_name, create=False)
    with env.begin(write=True) as txn:
        val = bytearray(txn.get(key, db=db))
        val[offset % len(val)] ^= 0x5A
        txn.put(key, bytes(val), db=db)
    env.close()


@pytest.mark.parametrize("codec", ["raw", "zstd", "zstd-planes"])
@pytest.mark.parametrize("where", ["payload", "frame"])
def test_corrupt_kv_block(tmp_path, codec, where):
    fp = tiny_fingerprint(num_layers=3)
    recs = make_chain(fp, 5)
    bad = recs[2].chunk_id
    with ChunkStore(tmp_path, fp, GB, codec=codec) as s:
        s.put_chunks(recs)
    offset = 4 if where == "frame" else 200  # codec id byte of the frame / inside the payload
    flip_byte(tmp_path, b"kv", bytes.fromhex(bad) + (1).to_bytes(2, "big"), offset)
    with ChunkStore(tmp_path, fp, GB) as s:
        s.get_kv(bad, 0)  # other layers of the chunk are fine
        with pytest.raises(CorruptBlock) as e:
            s.get_kv(bad, 1)
        assert e.value.chunk_id == bad and e.value.layer == 1 and bad in str(e.value)
        with pytest.raises(CorruptBlock):
            s.get_kv_many([recs[0].chunk_id, bad], 1)
        gone = s.delete(bad, reason="corrupt")
        assert set(gone) == {r.chunk_id for r in recs[2:]}
        assert s.has_many([r.chunk_id for r in recs]) == [True, True, False, False, False]
        k, _ = s.get_kv(recs[1].chunk_id, 1)
        assert np.array_equal(k, recs[1].k[1])
        s.put_chunks(recs[2:])  # the engine recomputes and publishes again
        assert np.array_equal(s.get_kv(bad, 1)[0], recs[2].k[1])


def test_corrupt_summary_and_header(tmp_path):
    fp = tiny_fingerprint()
    recs = make_chain(fp, 3)
    with ChunkStore(tmp_path, fp, GB) as s:
        s.put_chunks(recs)
    flip_byte(tmp_path, b"summaries", bytes.fromhex(recs[0].chunk_id), 30)
    flip_byte(tmp_path, b"headers", bytes.fromhex(recs[1].chunk_id), 40)
    with ChunkStore(tmp_path, fp, GB) as s:
        with pytest.raises(CorruptBlock) as e:
            s.get_summaries([recs[0].chunk_id])
        assert e.value.layer is None and e.value.part == "summary"
        with pytest.raises(CorruptBlock) as e:
            s.get_header(recs[1].chunk_id)
        assert e.value.part == "header" and e.value.chunk_id == recs[1].chunk_id
        with pytest.raises(CorruptBlock):
            list(s.iter_headers())
        seen = []
        assert len(list(s.iter_headers(on_corrupt=seen.append))) == 2 and len(seen) == 1
        # a chunk with an unreadable header can still be dropped, with its descendants
        assert set(s.delete(recs[1].chunk_id)) == {recs[1].chunk_id, recs[2].chunk_id}
        assert s.stats()["chunks"] == 1 and s.stats()["dbs"]["lru"]["entries"] == 1
        assert s.stats()["dbs"]["kv"]["entries"] == 2


def test_truncated_block(tmp_path):
    fp = tiny_fingerprint()
    rec = make_chain(fp, 1)[0]
    with ChunkStore(tmp_path, fp, GB) as s:
        s.put_chunks([rec])
    env = lmdb.open(str(tmp_path), max_dbs=16)
    db = env.open_db(b"kv", create=False)
    key = bytes.fromhex(rec.chunk_id) + b"\0\0"
    with env.begin(write=True) as txn:
        txn.put(key, bytes(txn.get(key, db=db))[:9], db=db)
    env.close()
    with ChunkStore(tmp_path, fp, GB) as s, pytest.raises(CorruptBlock):
        s.get_kv(rec.chunk_id, 0)
