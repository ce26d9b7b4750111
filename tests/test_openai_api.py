"""The OpenAI-compatible routes through the official `openai` client, on a real server."""

from __future__ import annotations

import json

import pytest
import requests

from sglang_reattn.server.launcher import ServerProcess

openai = pytest.importorskip("openai")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def srv():
    with ServerProcess(["--device", "cpu", "--context-length", "2048",
                        "--log-level", "warning"], api_key="test-key") as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="test-key", max_retries=0)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_and_usage(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=5, temperature=0, logprobs=2)
    choice = out.choices[0]
    assert "Paris" in choice.text and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    assert len(choice.logprobs.tokens) == 5 and len(choice.logprobs.top_logprobs[0]) == 2
    assert "".join(choice.logprobs.tokens) == choice.text


def test_completion_batch_n_stop_and_echo(client):
    out = client.completions.create(model=MODEL, prompt=["1, 2, 3,", "a, b, c,"],
                                    max_tokens=10, temperature=0, stop=[" 6"], n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy samples agree
    assert out.choices[0].finish_reason == "stop"
    echo = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=2,
                                     temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hi there")


def test_chat_template_and_stream(client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                          temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_tokens=3,
        temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert len(content[0].top_logprobs) == 2 and content[0].logprob <= 0


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
              "required": ["city"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a city, as JSON."}],
        max_tokens=32, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": schema}})
    assert set(json.loads(out.choices[0].message.content)) == {"city"}


def test_regex_extension(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=4,
        temperature=0, extra_body={"regex": "(yes|no)"})
    assert out.choices[0].message.content in ("yes", "no")


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                              "content": "x"}],
                                       temperature=-2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x " * 3000, max_tokens=4)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert client.models.list().data  # still serving


def test_api_key_on_every_route_but_health(srv):
    assert requests.get(srv.url + "/health", timeout=30).status_code == 200
    for method, path in (("GET", "/get_model_info"), ("GET", "/metrics"),
                         ("GET", "/server_info"), ("GET", "/health_generate"),
                         ("POST", "/generate"), ("POST", "/flush_cache")):
        r = requests.request(method, srv.url + path, timeout=30, json={"text": "x"})
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == 401
    r = requests.get(srv.url + "/get_model_info", headers=srv.headers, timeout=30)
    assert r.status_code == 200
