"""Named contexts over HTTP, on a real server process with a disk tier; reused after a
server restart."""

from __future__ import annotations

import requests

from sglang_reattn.server.launcher import ServerProcess

DOC = "The pass key is 7243. " + "The grass is green. The sky is blue. " * 40


def test_contexts_routes_and_reuse_across_restart(tiny_llama, tmp_path):
    flags = ["--model-path", tiny_llama, "--device", "cpu", "--kv-store-path",
             str(tmp_path / "store"), "--reattn-chunk-size", "16",
             "--chunked-prefill-size", "64"]
    greedy = {"max_new_tokens": 8, "temperature": 0}
    with ServerProcess(flags) as srv:
        r = requests.post(srv.url + "/contexts", json={"name": "doc", "text": DOC}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] >= 16 * 10 and r.json()["pinned"] is False
        bad = requests.post(srv.url + "/contexts", json={"name": "x"}, timeout=30)
        assert bad.status_code == 400
        listed = requests.get(srv.url + "/contexts", timeout=30).json()["contexts"]
        assert [c["name"] for c in listed] == ["doc"] and listed[0]["bytes"] > 0
        assert requests.post(srv.url + "/contexts/doc/pin", timeout=30).json()["pinned"]
        ref = requests.post(srv.url + "/generate", timeout=120, json={
            "text": DOC + " What is the pass key?", "sampling_params": greedy}).json()
    with ServerProcess(flags) as srv:  # restart: the store still has the chunks
        out = requests.post(srv.url + "/generate", timeout=120, json={
            "text": " What is the pass key?", "context": "doc",
            "sampling_params": greedy}).json()
        assert out["meta_info"]["cached_tokens"] >= 16 * 10
        metrics = requests.get(srv.url + "/metrics", timeout=30).text
        loaded = [line for line in metrics.splitlines()
                  if line.startswith("sglang_reattn:store_chunks_loaded{")]
        assert loaded and float(loaded[0].split()[-1]) >= 10
        miss = requests.post(srv.url + "/generate", timeout=30, json={
            "text": "hi", "context": "nope", "sampling_params": greedy})
        assert miss.status_code == 400 and "unknown context" in miss.text
        assert requests.delete(srv.url + "/contexts/doc", timeout=30).status_code == 200
        assert requests.get(srv.url + "/contexts", timeout=30).json()["contexts"] == []
        assert requests.delete(srv.url + "/contexts/doc", timeout=30).status_code == 400
    # A context stores the document's full chunks; the trailing partial chunk is kept as
    # token ids in its record, so the whole document is in front of the question.
    ctx_tokens = listed[0]["tokens"]
    assert listed[0]["stored_tokens"] % 16 == 0 and ctx_tokens - listed[0]["stored_tokens"] < 16
    assert out["meta_info"]["prompt_tokens"] > ctx_tokens
    assert ref["meta_info"]["prompt_tokens"] - ctx_tokens < 16 + 10
