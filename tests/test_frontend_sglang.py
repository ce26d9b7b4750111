"""SGLang frontend-language programs, unchanged, through `sgl.RuntimeEndpoint`.

`sglang` is a test dependency for its frontend only (installed with --no-deps plus a few
pure-python packages; see the server README section); skipped when it is missing.
"""

from __future__ import annotations

import json

import pytest

from sglang_reattn.server.launcher import ServerProcess

sgl = pytest.importorskip("sglang")


@pytest.fixture(scope="module")
def backend():
    with ServerProcess(["--device", "cpu", "--context-length", "2048",
                        "--log-level", "warning"]) as srv:
        endpoint = sgl.RuntimeEndpoint(srv.url)
        sgl.set_default_backend(endpoint)
        yield endpoint


@sgl.function
def chat_qa(s, question):
    s += sgl.system("You are a helpful assistant. Answer in one short sentence.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=24, stop="\n", temperature=0))


def test_roles_and_gen(backend):
    state = chat_qa.run(question="What is the capital of France?")
    assert "Paris" in state["answer"]
    assert "\n" not in state["answer"]
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[-1]["content"] == state["answer"]


@sgl.function
def multi_turn(s):
    s += sgl.user("Name a color.")
    s += sgl.assistant(sgl.gen("first", max_tokens=8, temperature=0))
    s += sgl.user("Name another one.")
    s += sgl.assistant(sgl.gen("second", max_tokens=8, temperature=0.7, top_p=0.9))


def test_multi_turn_and_temperature(backend):
    state = multi_turn.run()
    assert state["first"] and state["second"] is not None
    assert state.text().count("USER:") == 2  # SGLang's default template for this model


@sgl.function
def constrained(s):
    s += "Q: How many legs does a spider have?\nA: " + sgl.gen("legs", dtype=int,
                                                              max_tokens=4)
    s += "\nIs the sky blue? " + sgl.gen("yn", regex=r"(yes|no)", max_tokens=4)
    s += "\nThe sky is " + sgl.select("color", choices=["blue", "green", "plaid"])


def test_int_regex_select(backend):
    state = constrained.run()
    assert state["legs"].strip().lstrip("-").isdigit()
    assert state["yn"] in ("yes", "no")
    assert state["color"] == "blue"


@sgl.function
def forked(s):
    s += "Here are two fun facts about cats:\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"{i + 1}. " + sgl.gen("fact", max_tokens=12, stop="\n", temperature=0.8)
    forks.join()
    s += "Fact one: " + forks[0]["fact"] + "\nFact two: " + forks[1]["fact"]


def test_fork(backend):
    state = forked.run()
    assert "Fact one: " in state.text() and "Fact two: " in state.text()


@sgl.function
def long_answer(s):
    s += sgl.user("Tell me about the sea.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=32, temperature=0, ignore_eos=True))


def test_streaming(backend):
    # text_iter joins whatever arrived while its reader slept: a two-token answer came as
    # one piece once on the loaded 2-core machine. 32 tokens take far longer than a stall.
    state = long_answer.run(stream=True)
    pieces = list(state.text_iter("answer"))
    assert len(pieces) >= 2
    assert "".join(pieces) == state["answer"]
    assert state.get_meta_info("answer")["completion_tokens"] == 32


def test_run_batch(backend):
    states = chat_qa.run_batch([{"question": "What is 2+2?"},
                                {"question": "What color is grass?"},
                                {"question": "What is the capital of Italy?"}],
                               num_threads=3)
    assert all(st["answer"] for st in states)
    single = chat_qa.run(question="What is the capital of Italy?")
    assert states[2]["answer"] == single["answer"]  # greedy: batching does not change it


SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False,
})


@sgl.function
def json_person(s):
    s += sgl.user("Describe a person named Ada, aged 36, as JSON.")
    s += sgl.assistant(sgl.gen("person", max_tokens=48, json_schema=SCHEMA, temperature=0))


def test_json_schema(backend):
    person = json.loads(json_person.run()["person"])
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


def test_flush_cache_and_server_info(backend):
    sgl.flush_cache()
    info = sgl.get_server_info()
    assert "version" in info
