"""Crash safety of the disk tier at server level: a real server ingesting a document is
SIGKILLed at random points 20 times; after every kill the store opens, every chunk reads
back through its checksum, no half-written chunk is visible, and the next server answers
exactly. Finally a document's answer from the store equals the answer without it, and a
corrupted block is detected, reported, recomputed and the answers stay exact."""

from __future__ import annotations

import random
import threading
import time
from collections import deque

import requests
from _store_servers import (
    C,
    check_store,
    discard,
    discard_all,
    generate,
    ids,
    metric,
    start,
)
from sglang_reattn.kv_store import chunk_hashes
from sglang_reattn.testing import flip_kv_byte

KILLS = 20
PREFIX = ids(8 * C, 100)  # every document starts with it: each server reads it back
QUESTION = ids(5, 999)
CAPACITY = 3 << 20  # about 2.5 documents: eviction runs inside the killed transactions


def doc(i: int) -> list[int]:
    return PREFIX + ids(125 * C, 200 + i)  # 133 chunks


def _ingest(srv, name: str, tokens: list[int], box: dict) -> None:
    try:
        r = requests.post(srv.url + "/contexts", json={"name": name, "input_ids": tokens},
                          timeout=120)
        box["status"] = r.status_code
    except requests.RequestException as e:  # killed under it
        box["error"] = e


def _kill_mid_ingest(srv, name: str, tokens: list[int], rng: random.Random) -> bool:
    """Start ingesting, SIGKILL once a random number of its chunks are written (plus a
    random few ms, so the kill lands anywhere: in a prefill step, a copy, an LMDB
    transaction). True if the ingest was still running when killed."""
    target = metric(srv, "store_chunks_written") + rng.randint(
        1, len(tokens) // C - len(PREFIX) // C - 1)
    box: dict = {}
    t = threading.Thread(target=_ingest, args=(srv, name, tokens, box), daemon=True)
    t.start()
    deadline = time.time() + 60
    while "status" not in box and time.time() < deadline:
        try:
            if metric(srv, "store_chunks_written") >= target:
                break
        except (requests.RequestException, AssertionError):
            pass
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.03))
    running = "status" not in box
    discard(srv, kill=True)
    t.join(timeout=60)
    return running


def _context(srv, name: str) -> dict:
    listed = requests.get(srv.url + "/contexts", timeout=30).json()["contexts"]
    return {c["name"]: c for c in listed}[name]


def test_sigkill_during_ingest_20_times(tiny_llama, tmp_path):
    t0 = time.time()
    store = str(tmp_path / "store")
    flags = ["--kv-store-path", store, "--kv-store-capacity", str(CAPACITY)]
    rng = random.Random(20261129)
    final = doc(KILLS - 1)
    # Servers start in the background, two ahead, so startups overlap the ingests.
    ref_future = start(tiny_llama, "--disable-kv-store")
    spares = deque(start(tiny_llama, *flags) for _ in range(2))
    try:
        _run(tiny_llama, store, flags, rng, final, ref_future, spares, t0)
    finally:  # on a failure too, no server is left behind
        for f in spares:
            f.exception()  # wait until it is up (or failed)
        discard_all()


def _run(tiny_llama, store, flags, rng, final, ref_future, spares, t0) -> None:
    ref = ref_future.result()
    want_prefix = generate(ref, input_ids=PREFIX + QUESTION)["output_ids"]
    want_final = generate(ref, input_ids=final + QUESTION)["output_ids"]
    discard(ref)

    mid_ingest, sizes = 0, []
    for i in range(KILLS):
        srv = spares.popleft().result()
        # It serves, exactly, from whatever the killed servers left in the store.
        out = generate(srv, input_ids=PREFIX + QUESTION)
        assert out["output_ids"] == want_prefix, f"after kill {i}"
        mid_ingest += _kill_mid_ingest(srv, f"doc{i}", doc(i), rng)
        spares.append(start(tiny_llama, *flags))  # opens the store after this kill
        sizes.append(check_store(store, CAPACITY))  # opens; every chunk whole and intact
    assert mid_ingest >= KILLS - 2, f"only {mid_ingest} kills landed during the ingest"
    assert max(s["chunks"] for s in sizes) > 0

    # The last document (half written by a killed server) is finished by another one;
    # a server that did not compute it answers from the store alone, as without a store.
    writer, reader = spares.popleft().result(), spares.popleft()
    r = requests.post(writer.url + "/contexts", timeout=120,
                      json={"name": "final", "input_ids": final, "pin": True})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == len(final) and r.json()["complete"]
    discard(writer)
    reader = reader.result()
    out = generate(reader, context="final", input_ids=QUESTION)
    assert out["meta_info"]["cached_tokens"] == len(final)
    assert out["output_ids"] == want_final
    discard(reader)
    check_store(store, CAPACITY)

    # A damaged block (server stopped): detected, logged, counted in /metrics, the chunk
    # recomputed and republished; the answers stay exact, and so does the next one.
    bad = chunk_hashes(final, C)[40]
    flip_kv_byte(store, bad, 1)
    srv = start(tiny_llama, *flags).result()
    try:
        out = generate(srv, context="final", input_ids=QUESTION)
        assert out["output_ids"] == want_final
        assert out["meta_info"]["cached_tokens"] == 40 * C  # the chunks before the bad one
        assert metric(srv, "store_corrupt_blocks") == 1
        assert f"corrupt kv block for chunk {bad}" in srv.output()
        assert requests.post(srv.url + "/flush_cache", timeout=30).status_code == 200
        deadline = time.time() + 30  # republishing runs behind
        while not _context(srv, "final")["complete"] and time.time() < deadline:
            time.sleep(0.1)
        again = generate(srv, context="final", input_ids=QUESTION)
        assert again["output_ids"] == want_final
        assert again["meta_info"]["cached_tokens"] == len(final)  # all from the store again
        assert metric(srv, "store_corrupt_blocks") == 1
    finally:
        discard(srv)
    check_store(store, CAPACITY)
    print(f"{KILLS} kills ({mid_ingest} mid-ingest), store sizes "
          f"{[s['chunks'] for s in sizes]}, {time.time() - t0:.0f} s")
