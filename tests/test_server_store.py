"""The disk tier of launch_server: a default store per model under the user's cache
(XDG_CACHE_HOME, else ~/.cache), --disable-kv-store, and a full store: LRU eviction of
unpinned chunks within the capacity, a clear 507 when everything left is pinned."""

from __future__ import annotations

import os

import pytest
import requests
from _store_servers import C, check_store, discard, generate, ids, metric, start

from sglang_reattn.config import EngineArgs
from sglang_reattn.errors import InvalidArgument
from sglang_reattn.server.args import build_parser, parse_args


def test_flags():
    engine_args, _ = parse_args([])
    assert engine_args.kv_store_path == "auto" and engine_args.store_path == "auto"
    assert parse_args(["--disable-kv-store"])[0].store_path is None
    assert parse_args(["--kv-store-path", "/data/kv"])[0].store_path == "/data/kv"
    assert parse_args(["--kv-store-readonly"])[0].kv_store_readonly
    with pytest.raises(InvalidArgument, match="--disable-kv-store contradicts"):
        parse_args(["--disable-kv-store", "--kv-store-path", "/data/kv"])
    assert EngineArgs().store_path is None  # the offline Engine: only when asked for
    help_text = " ".join(build_parser().format_help().split())
    for needle in ("--disable-kv-store", "--kv-store-readonly", "XDG_CACHE_HOME",
                   "(default: auto)"):
        assert needle in help_text


def test_default_store_path(monkeypatch, tmp_path):
    from sglang_reattn.kv_store.synthetic import tiny_fingerprint

    from sglang_reattn.engine.store_tier import default_store_path

    fp = tiny_fingerprint()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a = default_store_path("/models/Llama-3.1-8B/", fp)
    assert os.path.dirname(a) == str(tmp_path / "xdg" / "sglang_reattn" / "kv_store")
    assert os.path.basename(a).startswith("Llama-3.1-8B-")
    assert default_store_path("/elsewhere/Llama-3.1-8B", fp) == a  # same model, same store
    assert default_store_path("/models/Llama-3.1-8B", dict(fp, chunk_size=32)) != a
    assert os.path.basename(default_store_path("/m/x y.gguf", fp)).startswith("x_y-")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path("/models/Llama-3.1-8B", fp) == str(
        tmp_path / "home" / ".cache" / "sglang_reattn" / "kv_store" / os.path.basename(a))


def test_server_uses_a_default_store(tiny_llama, private_cache_home, tmp_path, capsys):
    """Without --kv-store-path the server and the ingest CLI share one store per model
    under $XDG_CACHE_HOME (~/.cache without it); --disable-kv-store has none."""
    from sglang_reattn.engine.store_tier import kv_store_root
    from sglang_reattn.ingest import main as ingest
    from sglang_reattn.launch_server import main as launch

    root = private_cache_home / "sglang_reattn" / "kv_store"
    assert kv_store_root() == str(root)
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 7243. " + "The grass is green. The sky is blue. " * 30)
    flags = ["--model-path", tiny_llama, "--device", "cpu", "--reattn-chunk-size", str(C),
             "--chunked-prefill-size", "64", "--max-total-tokens", "32768",
             "--log-level", "warning"]
    assert ingest([str(doc), "--name", "doc"] + flags) == 0
    assert "store " + str(root) in capsys.readouterr().out
    (store,) = os.listdir(root)
    assert store.startswith("llama-")  # the model directory's name and a fingerprint hash
    home = tmp_path / "home"
    servers = [start(tiny_llama), start(tiny_llama, "--disable-kv-store"),
               start(tiny_llama, env={"XDG_CACHE_HOME": None, "HOME": str(home)}),
               start(tiny_llama, "--reattn-chunk-size", "32")]
    default, disabled, in_home, other = [f.result() for f in servers]
    try:
        def store_dir(srv):
            return requests.get(srv.url + "/server_info", timeout=30).json()["kv_store_dir"]

        assert store_dir(default) == str(root / store)
        out = generate(default, context="doc", text=" What is the pass key?")
        assert out["meta_info"]["cached_tokens"] >= 16 * 10  # the CLI's chunks
        assert store_dir(disabled) is None
        r = requests.get(disabled.url + "/contexts", timeout=30)
        assert r.status_code == 400 and "--disable-kv-store" in r.json()["message"]
        assert store_dir(in_home) == str(home / ".cache" / "sglang_reattn" / "kv_store" / store)
        assert os.path.dirname(store_dir(other)) == str(root) and store_dir(other) != str(
            root / store)  # another chunk size: another store, beside the first
        assert sorted(os.listdir(root)) == sorted([store, os.path.basename(store_dir(other))])
    finally:
        for srv in (default, disabled, in_home, other):
            discard(srv)
    assert launch(["--disable-kv-store", "--kv-store-path", str(tmp_path)]) == 2
    assert "contradicts" in capsys.readouterr().err


DOC_CHUNKS = 20
CAPACITY = 500_000  # about 2.7 documents of 20 chunks (about 9 KB charged per chunk)


def _contexts(srv) -> dict[str, dict]:
    listed = requests.get(srv.url + "/contexts", timeout=30).json()["contexts"]
    return {c["name"]: c for c in listed}


def _ingest(srv, name: str, seed: int, pin: bool = False) -> requests.Response:
    return requests.post(srv.url + "/contexts", timeout=120, json={
        "name": name, "input_ids": ids(DOC_CHUNKS * C, seed), "pin": pin})


def test_full_store_evicts_lru_and_refuses_when_all_pinned(tiny_llama, tmp_path):
    store = str(tmp_path / "store")
    srv = start(tiny_llama, "--kv-store-path", store, "--kv-store-capacity",
                str(CAPACITY)).result()
    try:
        for i in range(1, 5):  # 4 documents, room for fewer than 3
            assert _ingest(srv, f"d{i}", i).status_code == 200
            assert metric(srv, "store_bytes") <= metric(srv, "store_capacity") == CAPACITY
        ctx = _contexts(srv)
        # The least recently used went first (cut from their ends), the recent ones stay.
        assert [ctx[f"d{i}"]["complete"] for i in range(1, 5)] == [False, False, True, True]
        assert ctx["d1"]["lost_tokens"] > 0
        assert metric(srv, "store_chunks") < 4 * DOC_CHUNKS
        # An incomplete context is refused, not answered from what is left of it ...
        r = requests.post(srv.url + "/generate", timeout=60, json={
            "context": "d1", "input_ids": ids(4, 50)})
        assert r.status_code == 409 and "incomplete" in r.json()["message"], r.text
        # ... until it is ingested again (its KV still in memory: written back to disk).
        assert _ingest(srv, "d1", 1).status_code == 200
        assert _contexts(srv)["d1"]["complete"]
        out = generate(srv, context="d1", input_ids=ids(4, 50))
        assert out["meta_info"]["cached_tokens"] == DOC_CHUNKS * C

        # Pinned contexts are never evicted; when only pinned chunks (and the new
        # document's own ancestors) are left, ingesting more is a clear 507.
        assert _ingest(srv, "p1", 11, pin=True).status_code == 200
        assert _ingest(srv, "p2", 12, pin=True).status_code == 200
        errors_before = metric(srv, "store_write_errors")
        r = _ingest(srv, "p3", 13, pin=True)
        assert r.status_code == 507, r.text
        body = r.json()
        assert "StoreFull" in body["message"] and body["type"] == "InsufficientStorageError"
        assert body["error"]["code"] == 507
        assert metric(srv, "store_write_errors") > errors_before
        # The server keeps serving, the pinned contexts are whole, the bound holds.
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200
        ctx = _contexts(srv)
        assert "p3" not in ctx and ctx["p1"]["complete"] and ctx["p2"]["complete"]
        assert ctx["p1"]["pinned"] and ctx["p2"]["pinned"]
        out = generate(srv, context="p1", input_ids=ids(4, 51))
        assert out["meta_info"]["cached_tokens"] == DOC_CHUNKS * C
        assert metric(srv, "store_bytes") <= CAPACITY
        # Unpinning makes room again.
        assert requests.post(srv.url + "/contexts/p1/unpin", timeout=30).status_code == 200
        assert _ingest(srv, "p3", 13, pin=True).status_code == 200
        ctx = _contexts(srv)
        assert ctx["p3"]["complete"] and ctx["p2"]["complete"] and not ctx["p1"]["complete"]
    finally:
        discard(srv)
    counts = check_store(store, CAPACITY)
    assert counts["bytes"] <= CAPACITY and counts["contexts"] == 7
