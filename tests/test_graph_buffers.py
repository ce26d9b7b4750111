"""The decode CUDA-graph path's static buffers, exercised on the CPU: the runner's "graphs"
are replayed eagerly from the same buffers (`ModelRunner._record` off CUDA), so the
buffer filling, batch padding and both graph variants (plain, and with per-layer chunk
selection) must give the same tokens as the ordinary path."""

from __future__ import annotations

import torch

from sglang_reattn import Engine


def test_static_buffer_decode_matches_eager(tiny_llama):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (40, 900, 130)]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    with Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=64,
                log_level="warning") as eng:
        ref = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
        eng.flush_cache()
        eng.runner.prefill_tokens = 0  # decode graphs only (the prefill one: below)
        eng._call(lambda: eng.runner._capture(4))
        assert set(eng.runner.graphs) == {(b, s) for b in (1, 2, 4) for s in (False, True)}
        out = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
        one = eng.generate(input_ids=prompts[0], sampling_params=params)["output_ids"]
    assert out == ref and one == ref[0]


def test_page_tensor_follows_the_page_list():
    """The runner's cached int32 copy of a request's pages: extended on append, rebuilt
    when the list is replaced or shrinks, always equal to the list."""
    from types import SimpleNamespace

    from sglang_reattn.engine.model_runner import ModelRunner

    r = SimpleNamespace(pages=[5, 9, 2])
    seen = ModelRunner._pages_cpu(r)
    assert seen.tolist() == [5, 9, 2]
    r.pages.append(7)  # decode appends in place
    assert ModelRunner._pages_cpu(r).tolist() == [5, 9, 2, 7]
    for new_pages in ([5, 9, 2, 7, 1], [6, 9, 2, 7, 1, 4], [6, 9, 2, 7, 1, 5], [8], [], [5, 6]):
        r.pages = list(new_pages)
        assert ModelRunner._pages_cpu(r).tolist() == new_pages


def test_prefill_graph_matches_eager(tiny_llama):
    """The prefill graph (one sequence's pieces past the scope) on the CPU stand-in: the
    pieces it takes replay it from its static buffers, the others (the first pieces, the
    last one, a batch of two) run eagerly; tokens are the same as without it."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (1000, 700)]
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    scope = dict(reattn_chunk_size=16, reattn_sink=16, reattn_topk=4, reattn_local=64)
    # (a short context length keeps the graph's candidate width, which the CPU stand-in
    # scores in full, small)
    with Engine(tiny_llama, device="cpu", chunked_prefill_size=64, log_level="warning",
                disable_radix_cache=True, context_length=1200, **scope) as eng:
        ref = [eng.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts]
        both = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
        runner = eng.runner
        runner.prefill_tokens = 64
        eng._call(lambda: runner._capture(2))
        replays = []
        graph = runner._pf_graph
        orig = graph.replay
        graph.replay = lambda: (replays.append(1), orig())
        out = [eng.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts]
        # full pieces whose context is past the scope: more than 4 candidate chunks between
        # the sink (16) and the local window (64 before the piece), so from 192 cached on
        assert len(replays) == sum(1 for n in (1000, 700) for start in range(192, n, 64)
                                   if start + 64 < n)
        out2 = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)]
    assert out == ref and out2 == both


def test_no_prefill_graph_when_no_sequence_gets_past_the_scope(tiny_llama):
    """A context length within the scope: no piece could replay the prefill graph (and its
    capture's candidates would not fit the table), so none is captured."""
    scope = dict(reattn_chunk_size=16, reattn_sink=16, reattn_topk=20, reattn_local=64)
    with Engine(tiny_llama, device="cpu", chunked_prefill_size=64, log_level="warning",
                context_length=400, **scope) as eng:  # 27 pages < 1 + 20 + 8 of a scope
        runner = eng.runner
        runner.prefill_tokens = 64
        eng._call(lambda: runner._capture(1))
        assert runner._pf_graph is None and runner.prefill_tokens == 0


def test_prefill_capture_retries_without_cudnn(tiny_llama, monkeypatch):
    """A prefill capture that fails while cuDNN attention is on is retried with it off
    (flash); the knob is the prefill_attention module's, not the package's dispatcher."""
    import importlib

    pa = importlib.import_module("sglang_reattn.kernels.prefill_attention")
    monkeypatch.setattr(pa, "PREFILL_CUDNN", True)
    scope = dict(reattn_chunk_size=16, reattn_sink=16, reattn_topk=4, reattn_local=64)
    with Engine(tiny_llama, device="cpu", chunked_prefill_size=64, log_level="warning",
                disable_radix_cache=True, context_length=1200, **scope) as eng:
        runner = eng.runner
        runner.prefill_tokens = 64
        record, calls = runner._record, []

        def failing_once(run):
            calls.append(pa.PREFILL_CUDNN)
            if len(calls) == 1:
                raise RuntimeError("capture failed")
            return record(run)

        monkeypatch.setattr(runner, "_record", failing_once)
        eng._call(lambda: runner._capture_prefill(64))
        assert calls == [True, False] and runner._pf_graph is not None
        assert pa.PREFILL_CUDNN is False
