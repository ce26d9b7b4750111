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
