"""HTTP-layer tests against a fake engine: fast, deterministic, no model.

The fake follows the engine contract the server relies on (async_generate with explicit
rids, cumulative streams whose last chunk has finish_reason, abort, synchronous
InvalidRequest) and generates slowly on purpose, so disconnects and shutdown can be
observed in flight. Integration with the real engine is in test_server_native.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest
import requests
import uvicorn

from sglang_reattn.config import EngineArgs
from sglang_reattn.errors import ContextTooLong, InvalidRequest
from sglang_reattn.server.app import create_app
from sglang_reattn.server.args import ServerOptions

_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
         "presence_penalty", "repetition_penalty", "stop", "stop_token_ids",
         "min_new_tokens", "ignore_eos", "n", "seed", "regex", "json_schema",
         "skip_special_tokens", "no_stop_trim"}


class FakeTokenizer:
    """One token per byte."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kw):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Output: the prompt's characters reversed, cycling, one token per `delay` s."""

    def __init__(self, delay: float = 0.002, context_length: int = 4096) -> None:
        self.tokenizer = FakeTokenizer()
        self.served_model_name = "fake-model"
        self.context_length = context_length
        self.delay = delay
        self.aborted: set[str] = set()
        self.calls: list[dict[str, Any]] = []
        self.running: set[str] = set()
        self.shut_down = False
        self.cache_tokens: set[tuple[int, ...]] = set()

    # --- contract --------------------------------------------------------------------
    def _validate(self, prompt, input_ids, sp) -> list[int]:
        unknown = set(sp) - _KEYS
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter(s): {sorted(unknown)}")
        if sp.get("temperature", 1.0) < 0:
            raise InvalidRequest("temperature must be >= 0")
        if sp.get("max_new_tokens", 16) < 0:
            raise InvalidRequest("max_new_tokens must be >= 0")
        if "regex" in sp and sp["regex"].count("(") != sp["regex"].count(")"):
            raise InvalidRequest("invalid regex")
        if "json_schema" in sp:
            try:
                json.loads(sp["json_schema"])
            except ValueError:
                raise InvalidRequest("invalid json_schema") from None
        ids = input_ids if input_ids is not None else self.tokenizer.encode(prompt or "")
        if not ids:
            raise InvalidRequest("empty prompt")
        if len(ids) + sp.get("max_new_tokens", 16) > self.context_length:
            raise ContextTooLong(f"{len(ids)} prompt tokens exceed the context length")
        return ids

    def async_generate(self, prompt=None, sampling_params=None, input_ids=None,
                       return_logprob=False, logprob_start_len=None, top_logprobs_num=None,
                       return_text_in_logprobs=False, stream=False, rid=None, extra_key=None):
        sp = dict(sampling_params or {})
        ids = self._validate(prompt, input_ids, sp)
        assert rid is not None, "the server must always pass a rid"
        self.calls.append({"rid": rid, "sampling_params": sp, "stream": stream})
        args = (ids, sp, return_logprob, logprob_start_len, top_logprobs_num, rid)
        if stream:
            return self._stream(*args)
        return self._collect(*args)

    async def _collect(self, ids, sp, lp, start, top, rid):
        n = sp.pop("n", 1)
        outs = []
        for j in range(n):
            last = None
            async for last in self._stream(ids, sp, lp, start, top, rid if n == 1  # noqa: B007
                                           else f"{rid}-{j}"):
                pass
            outs.append(last)
        return outs[0] if n == 1 else outs

    async def _stream(self, ids, sp, lp, start, top, rid):
        self.running.add(rid)
        try:
            src = ids[::-1]
            max_new = sp.get("max_new_tokens", 16)
            cached = len(ids) if tuple(ids) in self.cache_tokens else 0
            self.cache_tokens.add(tuple(ids))
            out_ids: list[int] = []
            reason: dict[str, Any] = {"type": "length", "length": max_new}
            stops = sp.get("stop") or []
            stops = [stops] if isinstance(stops, str) else stops
            while len(out_ids) < max_new:
                await asyncio.sleep(self.delay)
                if rid in self.aborted:
                    reason = {"type": "abort"}
                    break
                out_ids.append(src[len(out_ids) % len(src)])
                text = self.tokenizer.decode(out_ids)
                hit = next((s for s in stops if s and s in text), None)
                if hit is not None:
                    text = text[: text.index(hit)]
                    reason = {"type": "stop", "matched": hit}
                    yield self._out(rid, text, out_ids, ids, cached, reason, lp, start, top)
                    return
                if len(out_ids) < max_new:
                    yield self._out(rid, text, out_ids, ids, cached, None, lp, start, top)
            text = self.tokenizer.decode(out_ids)
            yield self._out(rid, text, out_ids, ids, cached, reason, lp, start, top)
        finally:
            self.running.discard(rid)

    def _out(self, rid, text, out_ids, ids, cached, reason, lp, start, top):
        meta = {"id": rid, "finish_reason": reason, "prompt_tokens": len(ids),
                "completion_tokens": len(out_ids), "cached_tokens": cached,
                "e2e_latency": 0.0}
        if lp:
            def trip(t):
                return [-0.5, t, self.tokenizer.decode([t])]
            s = start if start is not None and start >= 0 else len(ids)
            meta["input_token_logprobs"] = [
                [None if i == 0 else -1.0, t, self.tokenizer.decode([t])]
                for i, t in enumerate(ids)][s:]
            meta["output_token_logprobs"] = [trip(t) for t in out_ids]
            k = top or 0
            meta["input_top_logprobs"] = [[trip(t)] * k if k else None for t in ids[s:]]
            meta["output_top_logprobs"] = [[trip(t)] * k if k else None for t in out_ids]
        return {"text": text, "output_ids": list(out_ids), "meta_info": meta}

    def abort(self, rid: str) -> None:
        self.aborted.add(rid)

    def flush_cache(self) -> bool:
        self.cache_tokens.clear()
        return True

    def get_model_info(self) -> dict[str, Any]:
        return {"model_path": "fake/model", "tokenizer_path": "fake/model",
                "is_generation": True}

    def get_server_info(self) -> dict[str, Any]:
        return {"engine": "fake"}

    def stats(self) -> dict[str, Any]:
        return {"num_running_reqs": len(self.running), "num_waiting_reqs": 0}

    def shutdown(self) -> None:
        self.shut_down = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    def __init__(self, engine: Any, api_key: str | None = None, **opts: Any) -> None:
        port = free_port()
        self.engine = engine
        self.url = f"http://127.0.0.1:{port}"
        args = EngineArgs(port=port, api_key=api_key)
        app = create_app(engine, args, ServerOptions(**opts))
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def fake():
    srv = ThreadServer(FakeEngine(), max_request_bytes=64 * 1024)
    yield srv
    srv.stop()
    assert srv.engine.shut_down


def post(srv, path, body, **kw):
    return requests.post(srv.url + path, json=body, timeout=30, **kw)


# --- /generate ---------------------------------------------------------------------------

def test_generate_single_and_meta(fake):
    r = post(fake, "/generate", {"text": "abc", "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"] == "cbac"
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 4
    assert {"id", "cached_tokens"} <= set(meta)


def test_generate_batch_ids_rid_and_stop(fake):
    r = post(fake, "/generate", {"input_ids": [[97, 98], [120, 121, 122]],
                                 "sampling_params": [{"max_new_tokens": 3},
                                                     {"max_new_tokens": 9, "stop": "x"}],
                                 "rid": ["r-a", "r-b"]})
    assert r.status_code == 200, r.text
    a, b = r.json()
    assert a["text"] == "bab" and a["meta_info"]["id"] == "r-a"
    assert b["text"] == "zy" and b["meta_info"]["finish_reason"] == {"type": "stop",
                                                                     "matched": "x"}


def test_generate_n_and_logprobs(fake):
    r = post(fake, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "n": 2},
                                 "return_logprob": True, "top_logprobs_num": 2,
                                 "return_text_in_logprobs": True, "logprob_start_len": 0})
    assert r.status_code == 200, r.text
    outs = r.json()
    assert len(outs) == 2
    meta = outs[0]["meta_info"]
    assert meta["output_token_logprobs"][0] == [-0.5, ord("i"), "i"]
    assert meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_top_logprobs"][0]) == 2


def sse_events(resp) -> list[Any]:
    events = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:]
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def test_generate_stream_cumulative(fake):
    with requests.post(fake.url + "/generate", json={"text": "abc", "stream": True,
                       "sampling_params": {"max_new_tokens": 5}}, stream=True, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert texts == ["c", "cb", "cba", "cbac", "cbacb"]
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-2])


def test_generate_stream_batch_has_index(fake):
    with requests.post(fake.url + "/generate", json={"text": ["ab", "xyz"], "stream": True,
                       "sampling_params": {"max_new_tokens": 3}}, stream=True, timeout=30) as r:
        events = sse_events(r)[:-1]
    final = {e["index"]: e["text"] for e in events if e["meta_info"]["finish_reason"]}
    assert final == {0: "bab", 1: "zyx"}


# --- bad input ---------------------------------------------------------------------------

BAD_BODIES = [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "expected a JSON object"),
    (json.dumps({"text": 5}).encode(), 400, "text"),
    (json.dumps({"text": "a", "bogus": 1}).encode(), 400, "bogus: unknown field"),
    (json.dumps({"text": "a", "sampling_params": {"tempurature": 1}}).encode(), 400,
     "tempurature"),
    (json.dumps({"text": "a", "sampling_params": {"max_new_tokens": "9"}}).encode(), 400,
     "max_new_tokens"),
    (json.dumps({"text": "a", "sampling_params": {"temperature": -1}}).encode(), 400,
     "temperature"),
    (json.dumps({"text": "a", "sampling_params": {"regex": "(a"}}).encode(), 400, "regex"),
    (json.dumps({"text": "a", "sampling_params": {"json_schema": "{"}}).encode(), 400,
     "json_schema"),
    (json.dumps({"text": ""}).encode(), 400, "empty"),
    (json.dumps({"text": "a" * 5000}).encode(), 400, "context length"),
    (json.dumps({"text": ["a", "b"], "rid": ["x"]}).encode(), 400, "rid"),
    (json.dumps({"text": "a", "lora_path": "x"}).encode(), 400, "lora_path"),
    (json.dumps({"text": "a" * 70000}).encode(), 413, "limit"),
]


@pytest.mark.parametrize("body,status,needle", BAD_BODIES, ids=[b[2] for b in BAD_BODIES])
def test_bad_input_is_4xx_json_and_server_survives(fake, body, status, needle):
    r = requests.post(fake.url + "/generate", data=body, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert needle.lower() in err["message"].lower(), err
    assert err["error"]["code"] == status
    ok = post(fake, "/generate", {"text": "ok", "sampling_params": {"max_new_tokens": 1}})
    assert ok.status_code == 200


def test_bad_stream_request_fails_before_headers(fake):
    r = post(fake, "/generate", {"text": "", "stream": True})
    assert r.status_code == 400 and "empty" in r.json()["message"]


def test_unknown_route_is_json_404(fake):
    r = requests.get(fake.url + "/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


# --- info, health, cache, metrics --------------------------------------------------------

def test_info_routes(fake):
    for path in ("/model_info", "/get_model_info"):
        info = requests.get(fake.url + path, timeout=10).json()
        assert info["model_path"] == "fake/model" and info["is_generation"] is True
    for path in ("/server_info", "/get_server_info"):
        info = requests.get(fake.url + path, timeout=10).json()
        assert info["port"] and "version" in info and info["internal_states"]
    assert requests.get(fake.url + "/health", timeout=10).status_code == 200
    assert requests.get(fake.url + "/health_generate", timeout=10).status_code == 200
    assert requests.post(fake.url + "/flush_cache", timeout=10).status_code == 200
    models = requests.get(fake.url + "/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "fake-model"


def test_metrics_count_tokens_and_latency(fake):
    with requests.post(fake.url + "/generate", json={"text": "metric", "stream": True,
                       "sampling_params": {"max_new_tokens": 6}}, stream=True, timeout=30) as r:
        sse_events(r)
    text = requests.get(fake.url + "/metrics", timeout=10).text
    for name in ("sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                 "sglang:cached_tokens_total", "sglang:num_requests_total",
                 "sglang:time_to_first_token_seconds_bucket",
                 "sglang:inter_token_latency_seconds_bucket", "sglang:num_running_reqs",
                 "sglang:num_queue_reqs"):
        assert name in text, name
    itl = [line for line in text.splitlines()
           if line.startswith("sglang:inter_token_latency_seconds_count")]
    assert float(itl[0].split()[-1]) >= 5


# --- OpenAI ------------------------------------------------------------------------------

def test_openai_completions(fake):
    r = post(fake, "/v1/completions", {"model": "fake-model", "prompt": "abc",
                                       "max_tokens": 3, "logprobs": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == "cba"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert out["choices"][0]["logprobs"]["tokens"] == ["c", "b", "a"]


def test_openai_chat_and_stream_usage(fake):
    body = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
            "max_tokens": 4, "stop": ["z"]}
    r = post(fake, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    full = r.json()["choices"][0]["message"]["content"]
    with requests.post(fake.url + "/v1/chat/completions", stream=True, timeout=30,
                       json={**body, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert deltas == full
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4


def test_openai_response_format_becomes_json_schema(fake):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = post(fake, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "t", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert json.loads(fake.engine.calls[-1]["sampling_params"]["json_schema"]) == schema


def test_openai_bad_input(fake):
    r = post(fake, "/v1/chat/completions", {"messages": [], "max_tokens": 1})
    assert r.status_code == 400 and "messages" in r.json()["message"]
    r = post(fake, "/v1/completions", {"prompt": "a", "temperature": "hot"})
    assert r.status_code == 400 and "temperature" in r.json()["message"]


# --- disconnects, auth, shutdown ---------------------------------------------------------

def _wait(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts(stream):
    srv = ThreadServer(FakeEngine(delay=0.05))
    try:
        body = json.dumps({"text": "slow", "stream": stream, "rid": f"gone-{stream}",
                           "sampling_params": {"max_new_tokens": 1000}}).encode()
        sock = socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait(lambda: f"gone-{stream}" in srv.engine.running)
        sock.close()
        _wait(lambda: f"gone-{stream}" in srv.engine.aborted)
        _wait(lambda: not srv.engine.running)
    finally:
        srv.stop()


def test_api_key():
    srv = ThreadServer(FakeEngine(), api_key="sekret")
    try:
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
        for path in ("/get_model_info", "/metrics", "/health_generate", "/v1/models"):
            r = requests.get(srv.url + path, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401, path
            r = requests.get(srv.url + path, timeout=10,
                             headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, path
            r = requests.get(srv.url + path, timeout=10,
                             headers={"Authorization": "Bearer sekret"})
            assert r.status_code == 200, path
        r = post(srv, "/generate", {"text": "a"})
        assert r.status_code == 401
    finally:
        srv.stop()


def test_stream_n_expanded_with_rids_and_indexes(fake):
    with requests.post(fake.url + "/generate", stream=True, timeout=30, json={
            "text": "ab", "rid": "nn", "stream": True,
            "sampling_params": {"max_new_tokens": 2, "n": 2, "seed": 5}}) as r:
        events = sse_events(r)[:-1]
    assert {e["index"] for e in events} == {0, 1}
    calls = [c for c in fake.engine.calls if c["rid"].startswith("nn/")]
    assert sorted(c["rid"] for c in calls) == ["nn/0", "nn/1"]
    assert sorted(c["sampling_params"]["seed"] for c in calls) == [5, 6]
    assert all("n" not in c["sampling_params"] for c in calls)


def test_abort_request_route():
    srv = ThreadServer(FakeEngine(delay=0.05))
    try:
        done = {}

        def run():
            done["out"] = post(srv, "/generate", {"text": "x", "rid": "to-abort",
                                                  "sampling_params": {"max_new_tokens": 500}})

        t = threading.Thread(target=run)
        t.start()
        _wait(lambda: "to-abort" in srv.engine.running)
        assert post(srv, "/abort_request", {"rid": "to-abort"}).status_code == 200
        t.join(10)
        assert done["out"].json()["meta_info"]["finish_reason"] == {"type": "abort"}
    finally:
        srv.stop()


def test_chat_without_max_tokens_may_fill_the_context(fake):
    r = post(fake, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                            "stop": "t"})
    assert r.status_code == 200, r.text
    prompt = r.json()["usage"]["prompt_tokens"]
    assert fake.engine.calls[-1]["sampling_params"]["max_new_tokens"] == 4096 - prompt
