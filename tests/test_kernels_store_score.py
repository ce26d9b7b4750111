"""store_kv (+ chunk summaries) and the chunk scorer: Triton (interpreter) vs torch references,
references vs brute force, and the package's import without Triton."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from sglang_reattn.kernels import HAS_TRITON
from sglang_reattn.kernels.testing import load_interpreted_kernels

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

# An interpreted copy of the package: TRITON_INTERPRET=1 is set only while these tests run
# (fixture below), so other test modules keep the normal dispatch (see kernels/testing.py).
K = load_interpreted_kernels() if HAS_TRITON else None


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ----------------------------------------------------------------------------- store_kv


def _store_schedule(page_size, gen):
    """Slot batches of a realistic run: a packed prefill of three sequences (one with a
    padding slot), then decode steps that cross page boundaries. Pages are handed out in
    a shuffled order so that page ids and token order disagree."""
    pool = torch.randperm(40, generator=gen).tolist()
    seq_pages = [[], [], []]
    lens = [0, 0, 0]

    def slot(s):
        off = lens[s] % page_size
        if off == 0:
            seq_pages[s].append(pool.pop())
        lens[s] += 1
        return seq_pages[s][-1] * page_size + off

    batches = []
    prefill = []
    for s, n in enumerate([2 * page_size + 3, 1, page_size]):
        prefill += [slot(s) for _ in range(n)]
        if s == 0:
            prefill.append(-1)  # padding token
    batches.append(prefill)
    for _ in range(page_size + 2):  # decode: one token per sequence, padded batch
        batches.append([slot(0), -1, slot(1), slot(2)])
    return batches, 40


@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 128)])
@pytest.mark.parametrize("dtype,summary_dtype", [(torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_store_kv_triton_matches_ref(page_size, num_kv_heads, head_dim, dtype, summary_dtype):
    gen = torch.Generator().manual_seed(page_size * 100 + head_dim)
    batches, num_pages = _store_schedule(page_size, gen)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    states = []
    for store in (K.store_kv_triton, K.store_kv_ref):
        g = torch.Generator().manual_seed(1)
        kc, vc = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        # stale summaries from a previous owner of the pages must not leak in
        summ = [torch.full((num_pages, num_kv_heads, head_dim), 1e4, dtype=summary_dtype)
                for _ in range(3)]
        for slots in batches:
            k = torch.randn(len(slots), num_kv_heads, head_dim, generator=g).to(dtype)
            v = torch.randn(len(slots), num_kv_heads, head_dim, generator=g).to(dtype)
            store(k, v, kc, vc, torch.tensor(slots, dtype=torch.int64), *summ)
        states.append((kc, vc, *summ))
    (kc, vc, kmin, kmax, kmean), (rkc, rvc, rkmin, rkmax, rkmean) = states
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    touched = sorted({s // page_size for b in batches for s in b if s >= 0})
    assert (rkmin[touched] < 1e4).all(), "reference did not refresh every touched page"
    torch.testing.assert_close(kmin, rkmin, atol=0, rtol=0)
    torch.testing.assert_close(kmax, rkmax, atol=0, rtol=0)
    tol = 1e-5 if summary_dtype == torch.float32 else 2e-2  # the running mean is rounded
    torch.testing.assert_close(kmean, rkmean, atol=tol, rtol=tol)


def test_store_kv_optional_summaries():
    gen = torch.Generator().manual_seed(0)
    kc = torch.zeros(4, 8, 2, 64)
    vc = torch.zeros_like(kc)
    k, v = torch.randn(10, 2, 64, generator=gen), torch.randn(10, 2, 64, generator=gen)
    slots = torch.arange(10, dtype=torch.int64) + 8  # pages 1 and 2
    kmean = torch.zeros(4, 2, 64)
    K.store_kv_triton(k, v, kc, vc, slots, kmean=kmean)  # mean only
    torch.testing.assert_close(kmean[1], k[:8].mean(0))
    torch.testing.assert_close(kmean[2], k[8:].mean(0))
    assert (kmean[0] == 0).all() and (kmean[3] == 0).all()
    # summary tables may hold rows past the cache's pages (the streaming tier's): untouched
    kmin, kmax = torch.full((7, 2, 64), 5.0), torch.full((7, 2, 64), 5.0)
    K.store_kv_triton(k, v, kc, vc, slots, kmin, kmax)
    torch.testing.assert_close(kmin[1], torch.minimum(k[:8].amin(0), torch.tensor(5.0)))
    assert (kmax[4:] == 5).all() and (kmin[4:] == 5).all()
    with pytest.raises(ValueError, match="Hkv, D"):
        K.store_kv_triton(k, v, kc, vc, slots, kmin[:3], kmax[:3])
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(kc)
    K.store_kv_triton(k, v, kc2, vc2, slots)  # no summaries
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    torch.testing.assert_close(kc.reshape(32, 2, 64)[8:18], k, atol=0, rtol=0)
    with pytest.raises(ValueError, match="together"):
        K.store_kv_triton(k, v, kc, vc, slots, kmin=kmean)


def test_chunk_summaries_ref_brute_force():
    gen = torch.Generator().manual_seed(2)
    kc = torch.randn(6, 5, 2, 16, generator=gen)
    pages, valid = torch.tensor([4, 0, 2]), torch.tensor([5, 1, 3])
    kmin, kmax, kmean = K.chunk_summaries_ref(kc, pages, valid)
    for i, (p, n) in enumerate(zip(pages.tolist(), valid.tolist())):
        for h in range(2):
            for d in range(16):
                col = [float(kc[p, t, h, d]) for t in range(n)]
                assert kmin[i, h, d] == min(col) and kmax[i, h, d] == max(col)
                assert abs(float(kmean[i, h, d]) - sum(col) / n) < 1e-6


# ----------------------------------------------------------------------------- scorer


def _scorer_inputs(batch, num_kv_heads, group, head_dim, q_dtype, summary_dtype, gen,
                   num_cands=(0, 5, 70), max_cands=70):
    num_pages = max_cands + 20
    kmin = torch.randn(num_pages, num_kv_heads, head_dim, generator=gen) - 1
    kmax = kmin + 2 * torch.rand(num_pages, num_kv_heads, head_dim, generator=gen)
    kmean = (kmin + kmax) / 2 + 0.1 * torch.randn(kmin.shape, generator=gen)
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=gen).to(q_dtype)
    # distinct pages per row (real candidates are), garbage beyond num_cands
    cand = torch.stack([torch.randperm(num_pages, generator=gen)[:max_cands]
                        for _ in range(batch)]).int()
    nc = torch.tensor(num_cands[:batch], dtype=torch.int32)
    return (q, cand, nc, kmin.to(summary_dtype), kmax.to(summary_dtype),
            kmean.to(summary_dtype))


@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (3, 3), (2, 4), (1, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_dtype,summary_dtype", [(torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.float32)])
@pytest.mark.parametrize("kind", ["minmax", "mean"])
def test_chunk_scores_triton_matches_ref(num_kv_heads, group, head_dim, q_dtype,
                                         summary_dtype, kind):
    gen = torch.Generator().manual_seed(group * 1000 + head_dim)
    q, cand, nc, kmin, kmax, kmean = _scorer_inputs(3, num_kv_heads, group, head_dim, q_dtype,
                                                    summary_dtype, gen)
    summ = dict(kmin=kmin, kmax=kmax) if kind == "minmax" else dict(kmean=kmean)
    for per_head in (False, True):
        out = K.chunk_scores_triton(q, cand, nc, per_head=per_head, **summ)
        ref = K.chunk_scores_ref(q, cand, nc, per_head=per_head, **summ)
        assert out.shape == ref.shape
        assert torch.isinf(ref[0]).all() and torch.isfinite(ref[2]).all()
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (3, 3), (1, 8)])
@pytest.mark.parametrize("head_dim", [64, 96])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["minmax", "mean"])
def test_chunk_scores_dot_kernel_matches_ref(num_kv_heads, group, head_dim, dtype, kind,
                                             monkeypatch):
    """The matrix-product scorer (max(q, 0) . kmax + min(q, 0) . kmin) for every row count:
    per-head scores, a block of candidates past the valid ones, a padded head dim; a program
    per block, or fewer programs looping over the blocks (the mean or float32, not both)."""
    sc = K.chunk_scores_triton.__globals__
    monkeypatch.setitem(sc, "SCORE_DOT_MIN_ROWS", 1)
    monkeypatch.setitem(sc, "SCORE_DOT_BLOCK_N", 16)
    monkeypatch.setitem(sc, "SCORE_DOT_WAVES", int((kind == "mean") != (dtype == torch.float32)))
    gen = torch.Generator().manual_seed(group * 100 + head_dim)
    q, cand, nc, kmin, kmax, kmean = _scorer_inputs(3, num_kv_heads, group, head_dim, dtype,
                                                    dtype, gen)
    summ = dict(kmin=kmin, kmax=kmax) if kind == "minmax" else dict(kmean=kmean)
    out = K.chunk_scores_triton(q, cand, nc, per_head=True, **summ)
    ref = K.chunk_scores_ref(q, cand, nc, per_head=True, **summ)
    assert torch.isinf(ref[0]).all() and torch.isfinite(ref[2]).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_scores_bound_and_mean_match_real_keys():
    """The min/max score bounds q.k of every key in the page; the mean score is its mean."""
    gen = torch.Generator().manual_seed(4)
    page_size, hkv, group, d = 9, 2, 3, 64
    kc = torch.randn(12, page_size, hkv, d, generator=gen)
    pages = torch.arange(12)
    kmin, kmax, kmean = K.chunk_summaries_ref(kc, pages, torch.full((12,), page_size))
    q = torch.randn(1, hkv * group, d, generator=gen)
    cand = torch.randperm(12, generator=gen)[None].int()
    nc = torch.tensor([12], dtype=torch.int32)
    bound = K.chunk_scores_triton(q, cand, nc, kmin=kmin, kmax=kmax, per_head=True)[0]
    mean = K.chunk_scores_triton(q, cand, nc, kmean=kmean, per_head=True)[0]
    keys = kc[cand[0].long()].repeat_interleave(group, 2)  # [N, C, Hq, D]
    qk = torch.einsum("hd,nchd->hnc", q[0], keys)  # [Hq, N, C]
    assert (qk.amax(-1) <= bound + 1e-4).all()
    assert (bound - qk.amax(-1)).abs().max() > 1e-2  # a bound, not the exact max
    torch.testing.assert_close(mean, qk.mean(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("combine", ["sum", "max"])
@pytest.mark.parametrize("topk", [0, 1, 4, 70, 100])
@pytest.mark.parametrize("kind", ["minmax", "mean"])
def test_score_chunks_selection(combine, topk, kind):
    gen = torch.Generator().manual_seed(topk)
    q, cand, nc, kmin, kmax, kmean = _scorer_inputs(3, 2, 4, 64, torch.float32, torch.float32,
                                                    gen)
    summ = dict(kmin=kmin, kmax=kmax) if kind == "minmax" else dict(kmean=kmean)
    sel, num = K.score_chunks_triton(q, cand, nc, topk, combine=combine, **summ)
    rsel, rnum = K.score_chunks_ref(q, cand, nc, topk, combine=combine, **summ)
    assert sel.shape == (3, topk) and sel.dtype == torch.int32
    assert torch.equal(num, rnum) and torch.equal(sel, rsel)
    # brute force from per-head reference scores
    per_head = K.chunk_scores_ref(q, cand, nc, per_head=True, **summ)  # [B, Hq, N]
    for b in range(3):
        n = int(nc[b])
        s = per_head[b, :, :n]
        if combine == "max" and n:
            s = s / s.abs().amax(-1, keepdim=True)
        total = s.sum(0).tolist()
        want = sorted(sorted(range(n), key=lambda i: -total[i])[:topk])
        assert int(num[b]) == min(topk, n)
        assert sel[b].tolist() == want + [-1] * (topk - len(want))


def test_combine_max_differs_from_sum():
    """Max-normalization stops one loud head from deciding alone."""
    scores = torch.tensor([[[100.0, 0.0, 0.0], [0.0, 1.0, 0.9]]])  # [B=1, Hq=2, N=3]
    assert K.combine_head_scores(scores, "sum").argmax().item() == 0
    torch.testing.assert_close(K.combine_head_scores(scores, "max"),
                               torch.tensor([[1.0, 1.0, 0.9]]))
    sel, num = K.select_topk(K.combine_head_scores(scores, "max"), torch.tensor([3]), 2)
    assert sel.tolist() == [[0, 1]] and num.tolist() == [2]


def test_select_topk_edges():
    scores = torch.tensor([[3.0, 1.0, 2.0, float("-inf")], [float("-inf")] * 4])
    sel, num = K.select_topk(scores, torch.tensor([3, 0], dtype=torch.int32), 6)
    assert sel.tolist() == [[0, 1, 2, -1, -1, -1], [-1] * 6] and num.tolist() == [3, 0]
    sel, num = K.select_topk(scores[:, :0], torch.zeros(2, dtype=torch.int32), 3)
    assert sel.tolist() == [[-1] * 3] * 2 and num.tolist() == [0, 0]


def test_scorer_rejects_bad_inputs():
    q, cand, nc, kmin, kmax, kmean = _scorer_inputs(3, 2, 4, 64, torch.float32, torch.float32,
                                                    torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="either kmin and kmax"):
        K.score_chunks_triton(q, cand, nc, 3, kmin=kmin, kmax=kmax, kmean=kmean)
    with pytest.raises(ValueError, match="combine"):
        K.score_chunks_triton(q, cand, nc, 3, kmean=kmean, combine="vote")
    with pytest.raises(ValueError, match="cand_pages"):
        K.score_chunks_triton(q, cand.long(), nc, 3, kmean=kmean)


# ----------------------------------------------------------------------------- select_scope


def _scope_inputs(batch, reps, num_kv_heads, group, head_dim, dtype, gen, max_cands):
    q, cand, nc, kmin, kmax, kmean = _scorer_inputs(
        batch * reps, num_kv_heads, group, head_dim, dtype, dtype, gen,
        num_cands=(0, 5, max_cands - 3), max_cands=max_cands)
    cand, nc = cand[::reps].contiguous(), nc[:batch].contiguous()
    nc[:] = torch.tensor([0, 5, max_cands - 3][:batch], dtype=torch.int32)
    head_table = torch.randint(0, 90, (batch, 2), generator=gen).int()
    head_pages = torch.tensor([0, 1, 2][:batch], dtype=torch.int32)
    local_table = torch.randint(0, 90, (batch, 3), generator=gen).int()
    local_tokens = torch.tensor([5, 9, 12][:batch], dtype=torch.int32)
    return q, cand, nc, (kmin, kmax, kmean), (head_table, head_pages, local_table, local_tokens)


@pytest.mark.parametrize("combine,reps,topk,max_cands", [
    ("max", 1, 0, 70), ("max", 1, 1, 70), ("max", 1, 5, 600), ("max", 1, 70, 300),
    ("max", 1, 300, 70), ("sum", 1, 5, 600), ("sum", 1, 64, 300), ("max", 3, 5, 600),
    ("sum", 3, 17, 300), ("max", 4, 9, 600), ("max", 16, 40, 300)])
@pytest.mark.parametrize("kind,dtype", [("minmax", torch.float32), ("mean", torch.bfloat16)])
def test_select_scope_triton_matches_ref(combine, reps, topk, max_cands, kind, dtype):
    """Scores, head combine, top-k over several sorted blocks, the table: one fused op."""
    gen = torch.Generator().manual_seed(topk * 7 + reps + max_cands)
    q, cand, nc, (kmin, kmax, kmean), scope = _scope_inputs(3, reps, 2, 4, 64, dtype, gen,
                                                            max_cands)
    summ = (kmin, kmax, None) if kind == "minmax" else (None, None, kmean)
    args = (q, cand, nc, *scope, topk, 16, *summ, combine, reps)
    out = K.select_scope_triton(*args)
    ref = K.select_scope_ref(*args)
    names = ("table", "lens", "sel_pages", "num_sel")
    for name, a, b in zip(names, out, ref):
        assert a.dtype == torch.int32 and torch.equal(a, b), name
    table, lens, sel, nsel = ref
    # independent check of row 2 against brute force over the combined scores
    want = min(topk, int(nc[2]))
    scores = K.scope_scores_ref(q, cand, nc, *summ, combine, reps)[2, :int(nc[2])]
    best = sorted(scores.argsort(descending=True)[:want].tolist())
    assert int(nsel[2]) == want and sel[2, :want].tolist() == cand[2, best].tolist()
    row = scope[0][2, :2].tolist() + cand[2, best].tolist() + scope[2][2].tolist()
    assert table[2, :len(row)].tolist() == row and int(lens[2]) == (2 + want) * 16 + 12


@pytest.mark.parametrize("topk,sort_block,max_cands,tile", [
    (9, 16, 1500, 256), (40, 64, 2600, 256), (3, 16, 300, 64), (9, 16, 600, 4096)])
def test_select_scope_merges_blocks_in_tiles(topk, sort_block, max_cands, tile, monkeypatch):
    """Small sort blocks and merge tiles: the first pass's picks (up to 163 blocks) span
    several tiles, which the table merges tile by tile, reading only the blocks that hold
    a row's candidates (row 1 has 5 of a padded width: half a tile). Same as the
    reference."""
    monkeypatch.setitem(K.select_scope_triton.__globals__, "MERGE_TILE", tile)
    gen = torch.Generator().manual_seed(70 + topk)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 1, 2, 4, 64, torch.float32, gen,
                                                        max_cands)
    args = (q, cand, nc, *scope, topk, 16, kmin, kmax, None, "max", 1)
    out = K.select_scope_triton(*args, sort_block=sort_block, method="sort")
    ref = K.select_scope_ref(*args)
    for name, a, b in zip(("table", "lens", "sel_pages", "num_sel"), out, ref):
        assert torch.equal(a, b), name
    assert int(out[3][2]) == topk



@pytest.mark.parametrize("bins,cap,small,block,copies", [
    (32, 16, 16, 2048, 1), (2048, 32, 16, 128, 4), (64, 1024, 256, 256, 3),
    (2048, 1024, 16, 64, 1)])
@pytest.mark.parametrize("combine,topk,spare", [("max", 9, 0), ("max", 40, 7), ("sum", 5, 3),
                                                ("sum", 33, 0)])
def test_select_scope_radix_threshold_paths(bins, cap, small, block, copies, combine, topk,
                                            spare, monkeypatch):
    """The radix top-k with few histogram bins, a small buffer and small blocks: bins
    crowded past the buffer take the exact-threshold search, the others are copied by
    every block's program (up to 21 a row) into the buffer; the buffer is sorted wider or
    narrower than its small width; the histogram of a row in one or several copies. Same as
    the reference, runners-up included."""
    g = K.select_scope_triton.__globals__
    for name, value in (("SELECT_BINS", bins), ("SELECT_CAP", cap), ("_SELECT_SMALL", small),
                        ("_SELECT_BLOCK", block), ("SELECT_HIST_COPIES", copies)):
        monkeypatch.setitem(g, name, value)
    gen = torch.Generator().manual_seed(90 + topk + bins)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 1, 2, 4, 64, torch.float32, gen,
                                                        1300)
    args = (q, cand, nc, *scope, topk, 16, kmin, kmax, None, combine, 1, None, 0)
    out = K.select_scope_triton(*args, spare)
    ref = K.select_scope_ref(*args, spare)
    for name, a, b in zip(("table", "lens", "sel_pages", "num_sel", "runners"), out, ref):
        assert torch.equal(a, b), name
    # the workspace (per-head maxima, histograms, counters) is left zeroed: a second call
    # needs no fill and gives the same
    assert not g["resting_zeros"](q.device, 3 * 8 + 3 * (copies * bins + 2),
                                  "select_scope").any()
    again = K.select_scope_triton(*args, spare)
    assert all(torch.equal(a, b) for a, b in zip(out, again))




@pytest.mark.parametrize("check", [False, True])
@pytest.mark.parametrize("dot,waves", [(False, 0), (True, 0), (True, 1)])
def test_select_scope_scorer_reads_the_max_before_its_atomic(check, dot, waves, monkeypatch):
    """SCORE_CHECK_SCALE: the scorer's atomic max runs only where it raises the head's max
    so far; the per-head maxima, and so the selection, are the same (small blocks: 19
    programs a head fold into each max; or, looping, 2 programs of 9-10 blocks each)."""
    sc = K.select_scope_triton.__globals__["launch_scorer"].__globals__
    monkeypatch.setitem(sc, "SCORE_CHECK_SCALE", check)
    monkeypatch.setitem(sc, "SCORE_DOT_WAVES", waves)
    monkeypatch.setitem(sc, "SCORE_BLOCK_N", 16)
    monkeypatch.setitem(sc, "SCORE_DOT_BLOCK_N", 16)
    monkeypatch.setitem(sc, "SCORE_DOT_MIN_ROWS", 1 if dot else 1000)
    gen = torch.Generator().manual_seed(13)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 2, 2, 4, 64, torch.float32, gen, 300)
    args = (q, cand, nc, *scope, 9, 16, kmin, kmax, None, "max", 2)
    out, ref = K.select_scope_triton(*args), K.select_scope_ref(*args)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))

def test_select_scope_radix_failed_launch_leaves_the_workspace_zeroed(monkeypatch):
    """The scorer and combine fill the workspace (head maxima, histogram); when the select
    launch then fails, the error propagates and the workspace is zeroed anyway, so the next
    call's normalization and counts start clean and match the reference."""
    g = K.select_scope_triton.__globals__
    gen = torch.Generator().manual_seed(11)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 1, 2, 4, 64, torch.float32, gen, 300)
    args = (q, cand, nc, *scope, 9, 16, kmin, kmax, None, "max", 1)

    class Broken:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                raise RuntimeError("launch failed")
            return launch

    kernel = g["_radix_select_kernel"]
    monkeypatch.setitem(g, "_radix_select_kernel", Broken())
    with pytest.raises(RuntimeError, match="launch failed"):
        K.select_scope_triton(*args)
    assert not g["resting_zeros"](q.device, 3 * 8 + 3 * (g["SELECT_BINS"] + 2),
                                  "select_scope").any()
    monkeypatch.setitem(g, "_radix_select_kernel", kernel)
    out, ref = K.select_scope_triton(*args), K.select_scope_ref(*args)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))

@pytest.mark.parametrize("cap", [16, 1024])
def test_select_scope_radix_ties_beyond_the_buffer(cap, monkeypatch):
    """Every chunk scores the same and (cap 16) more of them than the rank buffer holds: the
    exact threshold is the common score and the ties go to the lower indices, runners-up
    next in candidate order."""
    monkeypatch.setitem(K.select_scope_triton.__globals__, "SELECT_CAP", cap)
    gen = torch.Generator().manual_seed(3)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 1, 2, 4, 64, torch.float32, gen, 600)
    kmin, kmax = torch.zeros_like(kmin), torch.ones_like(kmax)
    q = q.round()  # (integer scores: equal whatever the order of the sums)
    _, _, sel, nsel, run = K.select_scope_triton(q, cand, nc, *scope, 9, 16, kmin, kmax, None,
                                                 "max", 1, None, 0, 4)
    assert nsel.tolist() == [0, 5, 9]
    assert sel[2].tolist() == cand[2, :9].tolist() and sel[1, :5].tolist() == cand[1, :5].tolist()
    assert run[2].tolist() == cand[2, 9:13].tolist() and run[1].tolist() == [-1] * 4

def test_select_scope_ties_go_to_the_lower_index():
    gen = torch.Generator().manual_seed(1)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 1, 2, 4, 64, torch.float32, gen, 600)
    kmin, kmax = torch.zeros_like(kmin), torch.ones_like(kmax)  # every chunk scores the same
    q = q.round()  # (integer scores: equal whatever the order of the sums)
    _, _, sel, nsel = K.select_scope_triton(q, cand, nc, *scope, 9, 16, kmin, kmax, None)
    assert nsel.tolist() == [0, 5, 9]
    assert sel[2].tolist() == cand[2, :9].tolist() and sel[1, :5].tolist() == cand[1, :5].tolist()


@pytest.mark.parametrize("topk", [5, 17])
def test_select_scope_maps_virtual_pages(topk):
    """Candidates from map_base on are virtual (the streaming tier's): the table holds the
    page each maps to (page 0 where the map says -1, not resident), while sel_pages keep
    the candidates' own pages; same as the reference, and as mapping the unmapped table."""
    gen = torch.Generator().manual_seed(30 + topk)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 1, 2, 4, 64, torch.float32, gen, 300)
    base = 150
    page_map = torch.randint(400, 500, (kmin.shape[0] - base,), generator=gen).int()
    page_map[::4] = -1
    args = (q, cand, nc, *scope, topk, 16, kmin, kmax, None, "max", 1)
    out = K.select_scope_triton(*args, page_map, base)
    ref = K.select_scope_ref(*args, page_map, base)
    for name, a, b in zip(("table", "lens", "sel_pages", "num_sel"), out, ref):
        assert torch.equal(a, b), name
    plain = K.select_scope_ref(*args)
    assert torch.equal(out[2], plain[2]) and torch.equal(out[1], plain[1])
    sel = plain[2][2, :topk]
    assert (sel >= base).any() and (sel < base).any()
    mapped = [p if p < base else max(int(page_map[p - base]), 0) for p in sel.tolist()]
    assert out[0][2, 2:2 + topk].tolist() == mapped


@pytest.mark.parametrize("topk,spare,max_cands", [(5, 11, 600), (17, 3, 300), (62, 66, 1500),
                                                (4, 8, 70)])
def test_select_scope_runners_up(topk, spare, max_cands):
    """`spare` adds the pages of the candidates ranked just below the top k, best first
    (-1 where a row has fewer), without changing the selection; same as the reference and
    as ranking the combined scores by brute force."""
    gen = torch.Generator().manual_seed(50 + topk + spare)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 1, 2, 4, 64, torch.float32, gen,
                                                        max_cands)
    args = (q, cand, nc, *scope, topk, 16, kmin, kmax, None, "max", 1, None, 0)
    out = K.select_scope_triton(*args, spare)
    ref = K.select_scope_ref(*args, spare)
    plain = K.select_scope_ref(*args)
    assert len(out) == len(ref) == 5
    for name, a, b, c in zip(("table", "lens", "sel_pages", "num_sel"), out, ref, plain):
        assert torch.equal(a, b) and torch.equal(a, c), name
    assert out[4].dtype == torch.int32 and out[4].shape == (3, spare)
    assert torch.equal(out[4], ref[4])
    scores = K.scope_scores_ref(q, cand, nc, kmin, kmax, None, "max", 1)
    for b in range(3):
        n = int(nc[b])
        order = scores[b, :n].argsort(descending=True).tolist()
        want = cand[b, order[topk:topk + spare]].tolist()
        assert out[4][b].tolist() == want + [-1] * (spare - len(want))


def test_select_scope_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(2)
    q, cand, nc, (kmin, kmax, _), scope = _scope_inputs(3, 2, 2, 4, 64, torch.float32, gen, 70)
    with pytest.raises(ValueError, match="query rows"):
        K.select_scope_triton(q, cand, nc, *scope, 4, 16, kmin, kmax, None, "max", 1)
    with pytest.raises(ValueError, match="head_table"):
        K.select_scope_triton(q, cand, nc, scope[0].long(), *scope[1:], 4, 16, kmin, kmax,
                              None, "max", 2)


# ----------------------------------------------------------------------------- packaging


def test_import_and_cpu_path_without_triton():
    """With triton unimportable, the package imports and the dispatchers use the references."""
    code = """
import sys
sys.modules["triton"] = None
import torch
import sglang_reattn.kernels as K
assert not K.HAS_TRITON
cos, sin = K.rope_tables(64, 16)
kc = torch.randn(3, 4, 1, 16); q = torch.randn(1, 2, 16)
pt = torch.tensor([[2, 0]], dtype=torch.int32); sl = torch.tensor([6], dtype=torch.int32)
out = K.decode_attention(q, kc, kc, pt, sl, cos, sin, 0.25)
assert torch.equal(out, K.decode_attention_ref(q, kc, kc, pt, sl, cos, sin, 0.25))
K.store_kv(kc[0], kc[0], kc, kc.clone(), torch.arange(4) + 4)
sel, n = K.score_chunks(q, pt, torch.tensor([2], dtype=torch.int32), 1, kmean=kc[:, 0].contiguous())
assert n.tolist() == [1]
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
