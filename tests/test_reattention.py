"""ReAttention: scope geometry, per-layer selection against an independent reference,
exact equality with full attention when the context fits, bounded positions beyond it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang_reattn import Engine
from sglang_reattn.config import EngineArgs, ReAttnConfig, resolve_reattn
from sglang_reattn.errors import InvalidArgument
from sglang_reattn.kernels.store_kv import chunk_summaries_ref
from sglang_reattn.layers.attention import ForwardBatch, KVPool
from sglang_reattn.layers.reattention import (
    ReAttention,
    build_scope_plan,
    completed_pages,
    plan_geometry,
)
from sglang_reattn.models.rope import RopeTable, apply_rope


def test_defaults_fit_trained_length_and_bad_combinations_are_named():
    cfg = resolve_reattn(EngineArgs(), 8192)
    assert cfg.sink == 64 and cfg.local == 2048
    assert cfg.scope_tokens + 64 + 2048 <= 8192 and cfg.topk >= 32
    with pytest.raises(InvalidArgument, match="exceeds the model's trained length"):
        resolve_reattn(EngineArgs(reattn_topk=200), 8192)
    with pytest.raises(InvalidArgument, match="--reattn-sink .* multiple"):
        resolve_reattn(EngineArgs(reattn_sink=10), 8192)
    with pytest.raises(InvalidArgument, match="no room"):
        resolve_reattn(EngineArgs(reattn_local=8192), 8192)
    with pytest.raises(InvalidArgument, match="--reattn-summary"):
        EngineArgs(reattn_summary="max")


def test_completed_pages():
    pages = [10, 11, 12, 13]
    assert completed_pages([pages], [0], [16], 16) == [10]
    assert completed_pages([pages], [0], [15], 16) == []
    assert completed_pages([pages], [15], [1], 16) == [10]
    assert completed_pages([pages], [31], [1], 16) == [11]
    assert completed_pages([pages], [10], [40], 16) == [10, 11, 12]


def test_geometry():
    cfg = ReAttnConfig(True, 16, 32, 4, 64)
    # 300 cached + 1 new: 19 pages; sink 2 pages; local from token 236 -> page 14.
    assert plan_geometry(cfg, 300, 1) == (2, 14, 19)
    # Short sequences: no middle, the last page is always local.
    assert plan_geometry(cfg, 0, 10) == (0, 0, 1)
    assert plan_geometry(cfg, 40, 1) == (2, 2, 3)


def _reference(q, keys, vals, cfg, rope, scale, summary, combine):
    """Independent ReAttention for one decode query: summaries straight from the keys."""
    c, n = cfg.chunk_size, keys.shape[0]
    sink_p, local_p, total = plan_geometry(cfg, n - 1, 1)
    hq, hkv = q.shape[1], keys.shape[1]
    g = hq // hkv
    per_head = torch.zeros(hq, local_p - sink_p)  # [Hq, chunks]
    for i, p in enumerate(range(sink_p, local_p)):
        kc = keys[p * c:(p + 1) * c].float()  # [C, Hkv, D]
        for h in range(hq):
            qh = q[0, h].float()
            if summary == "minmax":
                lo, hi = kc[:, h // g].amin(0), kc[:, h // g].amax(0)
                per_head[h, i] = torch.maximum(qh * lo, qh * hi).sum()
            else:
                per_head[h, i] = (qh * kc[:, h // g].mean(0)).sum()
    if combine == "max" and per_head.numel():  # heads normalized by their largest |score|
        per_head = per_head / per_head.abs().amax(1, keepdim=True)
    scores = per_head.sum(0).tolist()
    chosen = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[: cfg.topk])
    pages = list(range(sink_p)) + [sink_p + i for i in chosen] + list(range(local_p, total))
    idx = torch.cat([torch.arange(p * c, min((p + 1) * c, n)) for p in pages])
    k, v = keys[idx], vals[idx]
    m = k.shape[0]
    qr = apply_rope(q, rope.cos[m - 1:m], rope.sin[m - 1:m])[0]  # [Hq, D]
    kr = apply_rope(k, rope.cos[:m], rope.sin[:m])  # [m, Hkv, D]
    out = []
    for h in range(hq):
        w = torch.softmax((kr[:, h // g] @ qr[h]) * scale, 0)
        out.append(w @ v[:, h // g])
    return torch.stack(out)[None], pages


@pytest.mark.parametrize("combine", ["max", "sum"])
@pytest.mark.parametrize("summary", ["minmax", "mean"])
@pytest.mark.parametrize("n", [37, 300, 301, 512])
def test_selection_layer_matches_reference(summary, n, combine):
    torch.manual_seed(n)
    c, hq, hkv, d = 16, 8, 2, 32
    cfg = ReAttnConfig(True, c, 32, 4, 64)
    pages_needed = (n + c - 1) // c
    pool = KVPool(1, pages_needed + 5, c, hkv, d, torch.float32, torch.device("cpu"))
    rope = RopeTable(d, 10000.0, None, torch.device("cpu"))
    attn = ReAttention(pool, rope, hq, d, cfg, summary=summary, combine=combine)
    perm = (torch.randperm(pages_needed + 4) + 1)[:pages_needed].tolist()
    keys = torch.randn(n, hkv, d)
    vals = torch.randn(n, hkv, d)
    # Prefill all but the last token in pieces, as the engine does, then decode one.
    done = 0
    while done < n:
        step = 1 if done == n - 1 else min(48, n - 1 - done)
        slots = torch.tensor([perm[i // c] * c + i % c for i in range(done, done + step)])
        total = done + step
        table = torch.tensor([perm[: (total + c - 1) // c]], dtype=torch.int32)
        batch = ForwardBatch(step == 1 and done == n - 1, slots, table,
                             torch.tensor([total], dtype=torch.int32),
                             torch.tensor([0, step], dtype=torch.int32), step,
                             [perm[: (total + c - 1) // c]], [total], [step])
        batch.scope_plan = build_scope_plan(cfg, [perm], [done], [step], torch.device("cpu"))
        batch.completed_pages = torch.tensor(completed_pages([perm], [done], [step], c))
        q = torch.randn(step, hq, d)
        out = attn.forward(0, q, keys[done:total], vals[done:total], batch)
        done = total
    ref, ref_pages = _reference(q, keys, vals, cfg, rope, d ** -0.5, summary, combine)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert len(ref_pages) * c - n < c  # the scope is whole pages but the last


def test_reattention_equals_full_attention_when_context_fits(tiny_llama):
    ids = torch.randint(3, 49152, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    params = {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}
    outs = []
    for flags in ({"disable_reattn": True}, {}):
        with Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=64,
                    log_level="warning", **flags) as eng:
            assert (eng.reattn is None) == bool(flags)
            if eng.reattn is not None:
                assert eng.reattn.scope_tokens >= 320  # the whole context fits
            outs.append(eng.generate(input_ids=ids, sampling_params=params)["output_ids"])
    assert outs[0] == outs[1]


def test_context_beyond_trained_length_keeps_positions_bounded(tiny_llama):
    # The tiny model was "trained" to 512 positions; feed it 6x that.
    ids = torch.randint(3, 49152, (3000,), generator=torch.Generator().manual_seed(6)).tolist()
    with Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=64,
                log_level="warning") as eng:
        assert eng.context_length > 3000
        out = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 8,
                                                           "temperature": 0})
        assert out["meta_info"]["completion_tokens"] == 8
        # RoPE tables were never extended past the trained length (+ one chunk of slack).
        assert eng.rope.cos.shape[0] <= 512 + 16
        sel = eng.attn.last_selection
        assert len(sel) == eng.model_config.num_layers
        # Reusing the prefix gives the same answer.
        again = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 8,
                                                             "temperature": 0})
        assert again["meta_info"]["cached_tokens"] >= 2900
        assert again["output_ids"] == out["output_ids"]
    with Engine(tiny_llama, device="cpu", disable_reattn=True, log_level="warning") as full:
        with pytest.raises(Exception, match="context length"):
            full.generate(input_ids=ids, sampling_params={"max_new_tokens": 8})


@pytest.mark.parametrize("summary", ["minmax", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_pages_are_summarized_like_one_layer_at_a_time(summary, dtype):
    """`pages_loaded` summarizes every layer of the pages at once, in batches of pages:
    the same summaries as `chunk_summaries_ref` a layer at a time, other pages untouched."""
    g = torch.Generator().manual_seed(7)
    c, hkv, d, layers = 8, 2, 16, 3
    pool = KVPool(layers, 12, c, hkv, d, dtype, torch.device("cpu"))
    pool.k.copy_(torch.randn(pool.k.shape, generator=g))
    rope = RopeTable(d, 10000.0, None, torch.device("cpu"))
    attn = ReAttention(pool, rope, 4, d, ReAttnConfig(True, c, 2, c, 2 * c), summary=summary)
    pages = torch.tensor([9, 2, 5, 11, 3])
    for t in (attn.kmin, attn.kmax, attn.kmean):
        if t is not None:
            t.fill_(-7.0)
    attn.pages_loaded(pages, batch_bytes=2 * layers * c * hkv * d * 4)  # (3 batches)
    full = torch.full_like(pages, c)
    for layer in range(layers):
        want = chunk_summaries_ref(pool.k[layer], pages, full)
        got = (attn.kmin, attn.kmax) if summary == "minmax" else (attn.kmean,)
        for w, t in zip(want if summary == "minmax" else want[2:], got):
            assert torch.equal(t[layer, pages], w.to(t.dtype))
            others = [p for p in range(12) if p not in pages.tolist()]
            assert (t[layer, others] == -7.0).all()


@pytest.mark.parametrize("combine", ["max", "sum"])
@pytest.mark.parametrize("summary", ["minmax", "mean"])
def test_a_completing_streamed_piece_selects_for_its_last_token_in_the_same_call(
        summary, combine):
    """A streamed prefill piece that completes its prompt selects, in each layer, for the
    piece (its last R queries) and for its last token alone (what the next decode step
    scores, for `StreamTier.expect`) in one call: both equal separate selections."""
    from sglang_reattn import kernels as kn

    torch.manual_seed(11)
    c, hq, hkv, d, topk, spare = 8, 4, 2, 16, 3, 2
    cfg = ReAttnConfig(True, c, c, topk, 2 * c)
    pool = KVPool(1, 80, c, hkv, d, torch.float32, torch.device("cpu"))
    pool.k.copy_(torch.randn(pool.k.shape))
    rope = RopeTable(d, 10000.0, None, torch.device("cpu"))
    attn = ReAttention(pool, rope, hq, d, cfg, summary=summary, combine=combine,
                       num_virtual=4, spare=spare)  # (runners-up: a streaming tier's)
    attn.pages_loaded(torch.arange(80))
    got = {}

    class Stream:
        expect_next = True

        def resolve(self, layer, sel, nsel, runners):  # (host arrays, one copy back)
            got["piece"] = (sel.copy(), nsel.copy(), runners.copy())
            return sel

        def expect(self, layer, rows, sel, nsel, runners):
            got["last"] = (rows, sel.copy(), nsel.copy(), runners.copy())

    attn.stream = Stream()
    pages = [list(range(1, 40)), list(range(40, 80))]
    cached, q_lens = [250, 280], [20, 24]
    plan = build_scope_plan(cfg, pages, cached, q_lens, torch.device("cpu"), next_rows=[1])
    q = torch.randn(sum(q_lens), hq, d)
    attn.select(0, q, plan, streamed=True)
    args = (kn.select_scope_ref, attn.kmin[0] if summary == "minmax" else None,
            attn.kmax[0] if summary == "minmax" else None,
            attn.kmean[0] if summary == "mean" else None)

    def alone(qr, rows, reps):
        f, kmin, kmax, kmean = args
        _, _, sel, nsel, runners = f(
            qr, plan.cand_pages[rows], plan.num_cands[rows], plan.head_table[rows],
            plan.head_pages[rows], plan.local_table[rows], plan.local_tokens[rows], topk, c,
            kmin, kmax, kmean, combine, reps, None, pool.num_pages, spare)
        return sel, nsel, runners

    want = alone(q.index_select(0, plan.rep_index), [0, 1], plan.reps)
    for w, g in zip(want, got["piece"]):
        assert np.array_equal(w.numpy(), g)
    want = alone(q[[q_lens[0] + q_lens[1] - 1]], [1], 1)
    assert got["last"][0] == [1]
    for w, g in zip(want, got["last"][1:]):
        assert np.array_equal(w.numpy(), g)


def test_scope_assembled_on_the_host_equals_the_device_assembly():
    """assemble_scope_host (a streamed eager step's scope, built from its selection read
    back to the host) equals assemble_scope_ref on fresh random tables: rows of several
    sink, selection and local-window lengths, padded entries included."""
    import numpy as np

    from sglang_reattn.kernels import assemble_scope_host, assemble_scope_ref

    gen = torch.Generator().manual_seed(7)
    for trial in range(20):
        b = int(torch.randint(1, 5, (1,), generator=gen))
        s_w, k, l_w = (int(x) for x in torch.randint(1, 6, (3,), generator=gen))
        head = torch.randint(0, 100, (b, s_w), generator=gen, dtype=torch.int32)
        head_pages = torch.randint(0, s_w + 1, (b,), generator=gen, dtype=torch.int32)
        sel = torch.randint(0, 100, (b, k), generator=gen, dtype=torch.int32)
        nsel = torch.randint(0, k + 1, (b,), generator=gen, dtype=torch.int32)
        local = torch.randint(0, 100, (b, l_w), generator=gen, dtype=torch.int32)
        ltoks = torch.randint(1, 64 * l_w + 1, (b,), generator=gen, dtype=torch.int32)
        want_t, want_l = assemble_scope_ref(head, head_pages, sel, nsel, local, ltoks, 64)
        got_t, got_l = assemble_scope_host(head.numpy(), head_pages.numpy(), sel.numpy(),
                                           nsel.numpy(), local.numpy(), ltoks.numpy(), 64)
        assert got_t.dtype == np.int32 and got_l.dtype == np.int32
        assert np.array_equal(got_t, want_t.numpy()), trial
        assert np.array_equal(got_l, want_l.numpy()), trial
