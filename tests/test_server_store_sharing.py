"""Servers sharing one disk tier: two read a stored document while a third ingests new
ones. Answers equal those without a store and come from it (cached_tokens); a fourth
ingests at the same time as the third (LMDB serializes the writers); the one started with
--kv-store-readonly reads everything and refuses to write with a clear 409."""

from __future__ import annotations

import threading

import requests
from _store_servers import C, check_store, discard, generate, ids, metric, start

DOC = ids(40 * C, 1)  # the stored document both readers answer from
QUESTIONS = [ids(5, 100 + j) for j in range(4)]
OTHER = ids(30 * C, 99)  # ingested by a second writer meanwhile


def test_two_readers_while_a_third_writes(tiny_llama, tmp_path):
    store = str(tmp_path / "store")
    flags = ["--kv-store-path", store]
    ref_future = start(tiny_llama, "--disable-kv-store")
    writer = start(tiny_llama, *flags).result()
    servers = [writer]
    try:
        r = requests.post(writer.url + "/contexts", timeout=120,
                          json={"name": "doc", "input_ids": DOC, "pin": True})
        assert r.status_code == 200, r.text
        readonly_future = start(tiny_llama, *flags, "--kv-store-readonly")
        plain_future = start(tiny_llama, *flags)  # may write, here it reads
        writer2_future = start(tiny_llama, *flags)  # ingests while the writer does
        ref = ref_future.result()
        want = [generate(ref, input_ids=DOC + q)["output_ids"] for q in QUESTIONS]
        want_other = generate(ref, input_ids=OTHER + QUESTIONS[0])["output_ids"]
        discard(ref)
        readonly, plain = readonly_future.result(), plain_future.result()
        writer2 = writer2_future.result()
        servers += [readonly, plain, writer2]

        failures: list[str] = []

        def guarded(fn, *args):
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported by the test thread
                failures.append(f"{fn.__name__}: {type(e).__name__}: {e}")

        def read(srv):
            for _ in range(3):
                for q, expect in zip(QUESTIONS, want):
                    # Forget what is in memory: every answer loads the document anew.
                    assert requests.post(srv.url + "/flush_cache", timeout=30).status_code == 200
                    out = generate(srv, context="doc", input_ids=q)
                    assert out["output_ids"] == expect
                    assert out["meta_info"]["cached_tokens"] == len(DOC)
                    assert requests.post(srv.url + "/flush_cache", timeout=30).status_code == 200
                    out = generate(srv, input_ids=DOC + q)  # plain prefix reuse, no name
                    assert out["output_ids"] == expect
                    assert out["meta_info"]["cached_tokens"] == len(DOC)

        written: list[tuple[str, float]] = []
        reading = threading.Event()
        readers_done = threading.Event()

        def write(srv, docs):
            for name, tokens in docs:
                r = requests.post(srv.url + "/contexts", timeout=120,
                                  json={"name": name, "input_ids": tokens})
                assert r.status_code == 200, r.text
                written.append((name, reading.is_set() and not readers_done.is_set()))
                if readers_done.is_set():
                    return

        def new_docs():  # until the readers are done (at least 3, at most 40)
            for k in range(40):
                yield f"new{k}", ids(30 * C, 10 + k)
                if k == 0:
                    reading.wait(60)

        readers = [threading.Thread(target=guarded, args=(read, srv)) for srv in (readonly, plain)]
        writers = [threading.Thread(target=guarded, args=(write, writer, new_docs())),
                   threading.Thread(target=guarded, args=(write, writer2, [("other", OTHER)]))]
        for t in writers + readers:
            t.start()
        reading.set()
        for t in readers:
            t.join(timeout=300)
        readers_done.set()
        for t in writers:
            t.join(timeout=300)
        assert not failures, failures
        during = [name for name, while_reading in written if while_reading]
        assert len(during) >= 3, written  # the stores were written while being read
        print(f"{len(during)} documents ingested while the readers read")

        # Everyone sees everything written by the others.
        names = {"doc", *(name for name, _ in written)}
        for srv in servers:
            listed = requests.get(srv.url + "/contexts", timeout=30).json()["contexts"]
            assert {c["name"] for c in listed} == names
            assert all(c["complete"] for c in listed)
        out = generate(writer, context="other", input_ids=QUESTIONS[0])
        assert out["output_ids"] == want_other and out["meta_info"]["cached_tokens"] == len(OTHER)
        # The read-only server reads, never writes, and says so when asked to.
        assert metric(readonly, "store_readonly") == 1
        assert metric(readonly, "store_chunks_written") == 0
        assert metric(readonly, "store_chunks_loaded") >= 2 * len(QUESTIONS) * len(DOC) // C
        r = requests.post(readonly.url + "/contexts", timeout=30,
                          json={"name": "x", "input_ids": OTHER})
        assert r.status_code == 409 and "read-only" in r.json()["message"], r.text
        assert requests.delete(readonly.url + "/contexts/doc", timeout=30).status_code == 409
        for srv in (writer, plain, writer2):
            assert metric(srv, "store_readonly") == 0
            assert metric(srv, "store_write_errors") == 0
        assert metric(plain, "store_chunks_loaded") >= 2 * len(QUESTIONS) * len(DOC) // C
    finally:
        logs = [srv.output() for srv in servers]
        for srv in servers:
            discard(srv)
    for log in logs:  # no errors on any side (they log at warning level)
        assert "Traceback" not in log and "ERROR" not in log, log
    counts = check_store(store)
    assert counts["contexts"] == len(names)
