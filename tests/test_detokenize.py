from __future__ import annotations

import torch

from sglang_reattn.engine.detokenize import update_text
from sglang_reattn.engine.request import LogprobOptions, Request
from sglang_reattn.engine.sampling_params import SamplingParams


def test_incremental_text_equals_one_shot_decode(default_engine):
    tok = default_engine.tokenizer
    g = torch.Generator().manual_seed(0)
    streams = [tok.encode("Héllo wörld — 你好，世界! 🎉🎉 ok " * 3)]
    streams += [torch.randint(0, 49152, (60,), generator=g).tolist() for _ in range(10)]
    for ids in streams:
        r = Request("x", [1], SamplingParams.from_dict({}), LogprobOptions(), "", None)
        for t in ids:
            r.output_ids.append(t)
            update_text(r, tok)
        full = tok.decode(ids, skip_special_tokens=True)
        # Equal, except that a trailing half character is held back until it completes.
        assert r.text == full or (full.endswith("\ufffd") and full.startswith(r.text))
        update_text(r, tok, final=True)
        assert r.text == full


def test_tokens_view_slices_like_all_ids():
    r = Request("x", [1, 2, 3, 4], SamplingParams.from_dict({}), LogprobOptions(), "", None)
    r.output_ids = [5, 6]
    view = r.tokens
    assert len(view) == 6 and view[-1] == 6 and view[2] == 3
    for a in range(7):
        for b in range(a, 8):
            assert view[a:b] == r.all_ids[a:b] == r.ids_between(a, min(b, 6))
    assert [r.token_at(i) for i in range(6)] == r.all_ids
