"""The native (SGLang) HTTP API of a real server process on the default model, on CPU."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time

import pytest
import requests

from sglang_reattn.server.launcher import ServerProcess

CONTEXT = 1024
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def srv():
    with ServerProcess(["--device", "cpu", "--context-length", str(CONTEXT),
                        "--max-request-bytes", "200000", "--log-level", "warning"]) as s:
        yield s


def gen(srv, body, timeout=120):
    r = requests.post(srv.url + "/generate", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def sse(resp):
    events = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:]
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def running(srv) -> int:
    info = requests.get(srv.url + "/server_info", timeout=30).json()
    state = info["internal_states"][0]
    return state["num_running_reqs"] + state["num_waiting_reqs"]


def test_generate_text_and_ids_agree(srv):
    a = gen(srv, {"text": "The capital of France is",
                  "sampling_params": {"max_new_tokens": 6, **GREEDY}})
    assert "Paris" in a["text"]
    meta = a["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] > 0
    assert isinstance(meta["id"], str) and "cached_tokens" in meta
    ids = srv_tokenize("The capital of France is")
    b = gen(srv, {"input_ids": ids, "sampling_params": {"max_new_tokens": 6, **GREEDY}})
    assert b["text"] == a["text"]


def test_prefix_cache_reported(srv):
    # The cache is chunk-aligned (64 tokens): a prompt of a few chunks is reused.
    body = {"text": "Paris is a city of light and museums. " * 30,
            "sampling_params": {"max_new_tokens": 1, **GREEDY}}
    first = gen(srv, body)["meta_info"]
    second = gen(srv, body)["meta_info"]
    assert second["cached_tokens"] >= 64 and second["cached_tokens"] > first["cached_tokens"]


def srv_tokenize(text):
    from sglang_reattn.models.loader import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(None)).encode(text)


def test_batch_rid_stop_and_n(srv):
    outs = gen(srv, {"text": ["1, 2, 3, 4,", "a, b, c, d,"], "rid": ["num", "abc"],
                     "sampling_params": [{"max_new_tokens": 12, "stop": ["7"], **GREEDY},
                                         {"max_new_tokens": 3, **GREEDY}]})
    assert [o["meta_info"]["id"] for o in outs] == ["num", "abc"]
    assert outs[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "7"}
    assert "7" not in outs[0]["text"]
    samples = gen(srv, {"text": "Once upon a time", "sampling_params": {
        "max_new_tokens": 4, "n": 3, "temperature": 1.0, "seed": 7}})
    assert len(samples) == 3 and all(s["meta_info"]["completion_tokens"] == 4
                                     for s in samples)


def test_logprobs_shape(srv):
    out = gen(srv, {"text": "Hello world, this is", "return_logprob": True,
                    "logprob_start_len": 0, "top_logprobs_num": 3,
                    "return_text_in_logprobs": True,
                    "sampling_params": {"max_new_tokens": 3, **GREEDY}})
    meta = out["meta_info"]
    assert len(meta["output_token_logprobs"]) == 3
    lp, tid, text = meta["output_token_logprobs"][0]
    assert lp <= 0 and isinstance(tid, int) and isinstance(text, str)
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert len(meta["output_top_logprobs"][0]) == 3
    # greedy: the chosen token is the top-1 alternative
    assert meta["output_top_logprobs"][0][0][1] == tid


def test_stream_is_cumulative_and_matches(srv):
    body = {"text": "Write a haiku about the sea.",
            "sampling_params": {"max_new_tokens": 12, **GREEDY}}
    full = gen(srv, body)["text"]
    with requests.post(srv.url + "/generate", json={**body, "stream": True}, stream=True,
                       timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert texts[-1] == full
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"


BAD = [
    ({"text": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
    ({"text": "hi", "sampling_params": {"top_p": 1.5}}, "top_p"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"regex": "(unclosed"}}, "regex"),
    ({"text": "hi", "sampling_params": {"json_schema": "{not json"}}, "json"),
    ({"text": "hi", "sampling_params": {"bogus": 1}}, "bogus"),
    ({"text": "hi", "sampling_params": {"n": "2"}}, "n"),
    ({"text": "word " * (CONTEXT + 10)}, "context length"),
    ({"text": ""}, "empty"),
    ({"input_ids": [10 ** 9]}, "input_ids"),
    ({"text": "hi", "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_input_400_then_ok(srv, body, needle):
    r = requests.post(srv.url + "/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert needle.lower() in r.json()["message"].lower()
    assert gen(srv, {"text": "ok", "sampling_params": {"max_new_tokens": 1}})["text"]


def test_malformed_and_oversized_bodies(srv):
    for data, status in ((b"{oops", 400), (b"x" * 300_000, 413)):
        r = requests.post(srv.url + "/generate", data=data, timeout=60,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == status and r.json()["error"]["code"] == status
    assert gen(srv, {"text": "ok", "sampling_params": {"max_new_tokens": 1}})["text"]


def test_info_health_cache_routes(srv):
    for path in ("/model_info", "/get_model_info"):
        info = requests.get(srv.url + path, timeout=30).json()
        assert "SmolLM2" in info["model_path"] and info["is_generation"]
    for path in ("/server_info", "/get_server_info"):
        info = requests.get(srv.url + path, timeout=30).json()
        assert info["context_length"] == CONTEXT and "version" in info
    assert requests.get(srv.url + "/health", timeout=30).status_code == 200
    assert requests.get(srv.url + "/health_generate", timeout=60).status_code == 200
    assert requests.post(srv.url + "/flush_cache", timeout=30).status_code == 200
    models = requests.get(srv.url + "/v1/models", timeout=30).json()["data"]
    assert models[0]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_metrics(srv):
    with requests.post(srv.url + "/generate", stream=True, timeout=120, json={
            "text": "Count: one, two,", "stream": True,
            "sampling_params": {"max_new_tokens": 5, **GREEDY}}) as r:
        sse(r)
    text = requests.get(srv.url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    assert values["sglang:prompt_tokens_total"] > 0
    assert values["sglang:generation_tokens_total"] >= 5
    assert values["sglang:num_requests_total"] >= 1
    assert values["sglang:time_to_first_token_seconds_count"] >= 1
    assert values["sglang:inter_token_latency_seconds_count"] >= 4
    assert "sglang:cached_tokens_total" in values
    assert "sglang:num_running_reqs" in values and "sglang:num_queue_reqs" in values


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts(srv, stream):
    body = json.dumps({"text": "Tell me a very long story.", "stream": stream,
                       "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}})
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    deadline = time.time() + 60
    while running(srv) == 0:
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    sock.close()
    deadline = time.time() + 15  # 900 tokens would take much longer than this on CPU
    while running(srv) != 0:
        assert time.time() < deadline, "the request was not aborted"
        time.sleep(0.1)


def test_32_concurrent_greedy_clients_match_single(srv):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(8)]

    def one(i):
        return gen(srv, {"text": prompts[i % 8],
                         "sampling_params": {"max_new_tokens": 8, **GREEDY}}, 300)["text"]

    single = [one(i) for i in range(8)]
    with cf.ThreadPoolExecutor(32) as pool:
        many = list(pool.map(one, range(32)))
    assert many == [single[i % 8] for i in range(32)]
