"""Engine behaviour: prefix reuse, batching, chunked prefill, preemption, sampling
parameters, logprobs, constrained decoding, bad input."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch

from sglang_reattn import Engine
from sglang_reattn.errors import ContextTooLong, InvalidArgument, InvalidRequest

GREEDY = {"max_new_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama):
    eng = Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=64,
                 context_length=512, log_level="warning")
    yield eng
    eng.shutdown()


def _rand_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


def test_prefix_reuse_gives_same_output(tiny_llama):
    doc = _rand_ids(200, 0)
    with Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=64,
                disable_radix_cache=True, log_level="warning") as cold:
        ref = [cold.generate(input_ids=doc + _rand_ids(7, s), sampling_params=GREEDY)
               for s in (1, 2)]
    with Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=64,
                log_level="warning") as warm:
        first = warm.generate(input_ids=doc + _rand_ids(7, 1), sampling_params=GREEDY)
        second = warm.generate(input_ids=doc + _rand_ids(7, 2), sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == 192  # 12 full chunks of 16 tokens
    assert [first["output_ids"], second["output_ids"]] == [r["output_ids"] for r in ref]


def test_batch_equals_one_at_a_time(tiny_engine):
    prompts = [_rand_ids(n, 10 + n) for n in (3, 17, 40, 64, 65, 100, 130, 5)]
    singles = [tiny_engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
               for p in prompts]
    tiny_engine.flush_cache()
    batch = tiny_engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [b["output_ids"] for b in batch] == singles


def test_chunked_prefill_and_preemption_keep_outputs(tiny_llama):
    prompts = [_rand_ids(n, 50 + n) for n in (150, 90, 33, 120)]
    params = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    with Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=128,
                log_level="warning") as big:
        ref = [o["output_ids"] for o in big.generate(input_ids=prompts, sampling_params=params)]
    # 16-token prefill pieces and a pool so small that decode must preempt.
    with Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=16,
                max_total_tokens=16 * 24, log_level="warning") as small:
        out = [o["output_ids"] for o in small.generate(input_ids=prompts, sampling_params=params)]
        assert small.stats()["preemptions"] > 0
    assert out == ref


def test_bad_input_raises_and_engine_keeps_working(tiny_engine):
    bad_calls = [
        (dict(prompt=""), "empty"),
        (dict(input_ids=[]), "empty"),
        (dict(prompt="hi", sampling_params={"max_new_tokens": -1}), "max_new_tokens"),
        (dict(prompt="hi", sampling_params={"max_new_tokens": 10**9}), "context length"),
        (dict(prompt="hi", sampling_params={"regex": "(unclosed"}), "invalid regex"),
        (dict(prompt="hi", sampling_params={"json_schema": "{not json"}), "invalid json_schema"),
        (dict(input_ids=[5] * 600), "context length"),
        (dict(prompt="hi", sampling_params={"temprature": 0.5}), "unknown sampling"),
        (dict(prompt="hi", sampling_params={"top_p": 0}), "top_p"),
        (dict(prompt="hi", sampling_params={"temperature": -1}), "temperature"),
        (dict(prompt="hi", sampling_params={"top_k": 0}), "top_k"),
        (dict(prompt="hi", sampling_params={"stop": 5}), "stop"),
        (dict(input_ids=[10**7]), "input_ids"),
        (dict(input_ids=[5, 2**70]), "input_ids"),
        (dict(input_ids=[5, -1]), "input_ids"),
        (dict(input_ids=[5, True]), "input_ids"),
        (dict(input_ids=[5, 6.0]), "input_ids"),
        (dict(input_ids=[0, False, 7]), "input_ids"),
        (dict(input_ids=[5, None]), "input_ids"),
        (dict(input_ids=[5, "6"]), "input_ids"),
        (dict(input_ids=[[5], "6"]), "input_ids"),
        (dict(prompt="hi", top_logprobs_num=-2, return_logprob=True), "top_logprobs_num"),
    ]
    for kwargs, msg in bad_calls:
        with pytest.raises(InvalidRequest, match=re.compile(msg, re.I)):
            tiny_engine.generate(**kwargs)
    with pytest.raises(ContextTooLong):
        tiny_engine.generate(input_ids=[5] * 600)
    out = tiny_engine.generate(prompt="still alive", sampling_params={"max_new_tokens": 3})
    assert out["meta_info"]["completion_tokens"] == 3


def test_bad_engine_options_are_named():
    with pytest.raises(InvalidArgument, match="max_running_requestz"):
        Engine(max_running_requestz=3)
    with pytest.raises(InvalidArgument, match="--dtype"):
        Engine(dtype="float64")
    with pytest.raises(InvalidArgument, match="chunked-prefill-size"):
        Engine(chunked_prefill_size=100, reattn_chunk_size=64)


def test_seed_n_and_sampling_controls(tiny_engine):
    p = {"max_new_tokens": 12, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    a = tiny_engine.generate(prompt="seeded", sampling_params=p)
    b = tiny_engine.generate(prompt="seeded", sampling_params=p)
    assert a["output_ids"] == b["output_ids"]
    many = tiny_engine.generate(prompt="seeded", sampling_params=dict(p, n=3))
    assert len(many) == 3 and many[0]["output_ids"] == a["output_ids"]
    assert len({tuple(m["output_ids"]) for m in many}) > 1
    greedy = tiny_engine.generate(prompt="x", sampling_params=GREEDY)["output_ids"]
    topk1 = tiny_engine.generate(prompt="x", sampling_params={"max_new_tokens": 16,
                                                               "top_k": 1})["output_ids"]
    assert greedy == topk1
    plain = tiny_engine.generate(prompt="x", sampling_params=dict(
        GREEDY, max_new_tokens=40, ignore_eos=True))["output_ids"]
    # stop_token_ids and min_new_tokens.
    stop_tok = plain[5]
    out = tiny_engine.generate(prompt="x", sampling_params=dict(
        GREEDY, max_new_tokens=40, stop_token_ids=[stop_tok]))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    assert out["output_ids"][-1] == stop_tok and stop_tok not in out["output_ids"][:-1]
    out = tiny_engine.generate(prompt="x", sampling_params=dict(
        GREEDY, max_new_tokens=40, stop_token_ids=[stop_tok], min_new_tokens=30))
    assert out["meta_info"]["completion_tokens"] >= 30


def test_logprobs_match_reference(tiny_engine, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = _rand_ids(50, 3)
    out = tiny_engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 4,
                                                               "temperature": 0},
                               return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
                               return_text_in_logprobs=True)
    meta = out["meta_info"]
    full = ids + out["output_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
    inp = meta["input_token_logprobs"]
    assert len(inp) == len(ids) and inp[0][0] is None and inp[0][1] == ids[0]
    expect = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    torch.testing.assert_close(torch.tensor([x[0] for x in inp[1:]]), torch.tensor(expect),
                               atol=1e-4, rtol=1e-4)
    outlp = meta["output_token_logprobs"]
    expect = [lp[len(ids) - 1 + i, t].item() for i, t in enumerate(out["output_ids"])]
    torch.testing.assert_close(torch.tensor([x[0] for x in outlp]), torch.tensor(expect),
                               atol=1e-4, rtol=1e-4)
    assert all(isinstance(x[2], str) for x in outlp)
    top = meta["output_top_logprobs"][0]
    assert len(top) == 3 and top[0][1] == out["output_ids"][0]
    # logprob_start_len in the middle returns only the tail.
    part = tiny_engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1},
                                return_logprob=True, logprob_start_len=40)
    assert len(part["meta_info"]["input_token_logprobs"]) == 10


def test_stream_is_cumulative_and_async_works(default_engine):
    chunks = list(default_engine.generate("Count: one, two,", {"max_new_tokens": 8,
                                                               "temperature": 0}, stream=True))
    texts = [c["text"] for c in chunks]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    final = default_engine.generate("Count: one, two,", {"max_new_tokens": 8, "temperature": 0})
    assert texts[-1] == final["text"] and chunks[-1]["meta_info"]["finish_reason"] is not None

    async def run():
        outs = await asyncio.gather(*[
            default_engine.async_generate("Count: one, two,", {"max_new_tokens": 8,
                                                               "temperature": 0})
            for _ in range(4)])
        stream = await default_engine.async_generate("Count: one, two,",
                                                     {"max_new_tokens": 8, "temperature": 0},
                                                     stream=True)
        last = None
        async for c in stream:
            last = c
        return outs, last

    outs, last = asyncio.run(run())
    assert all(o["text"] == final["text"] for o in outs) and last["text"] == final["text"]


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                     {"repetition_penalty": 2.0}])
def test_penalties_reduce_repetition(default_engine, penalty):
    prompt = "one one one one one one one one one one"
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = default_engine.generate(prompt, params)["output_ids"]
    pen = default_engine.generate(prompt, dict(params, **penalty))["output_ids"]
    assert len(set(pen)) > len(set(plain)), (plain, pen)


def test_stop_strings(default_engine):
    base = default_engine.generate("Count: one, two,", {"max_new_tokens": 12, "temperature": 0})
    assert " four" in base["text"]
    out = default_engine.generate("Count: one, two,", {"max_new_tokens": 12, "temperature": 0,
                                                       "stop": [" four"]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " four"}
    assert out["text"] == base["text"][: base["text"].index(" four")]
    kept = default_engine.generate("Count: one, two,", {"max_new_tokens": 12, "temperature": 0,
                                                        "stop": " four", "no_stop_trim": True})
    assert kept["text"].endswith(" four")


def test_regex_and_json_schema(default_engine):
    out = default_engine.generate("My phone number is", {"max_new_tokens": 20,
                                                         "regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", out["text"])
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    out = default_engine.generate("Describe a person as JSON:", {"max_new_tokens": 64,
                                                                 "json_schema": json.dumps(schema),
                                                                 "temperature": 0})
    obj = json.loads(out["text"])
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)


def test_abort_and_flush(default_engine):
    it = default_engine.generate("Tell me a long story.", {"max_new_tokens": 200,
                                                           "ignore_eos": True},
                                 stream=True, rid="to-abort")
    next(it)
    default_engine.abort("to-abort")
    last = list(it)[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 200
    assert default_engine.flush_cache() is True
    again = default_engine.generate("Tell me a long story.", {"max_new_tokens": 2})
    assert again["meta_info"]["cached_tokens"] == 0
