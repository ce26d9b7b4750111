"""One layer of decode attention at long contexts: ReAttention scope vs full attention.

For Llama-3.1-8B head shapes (32 q heads, 8 KV heads, head dim 128, bf16, batch 1) and each
context length, times (``triton.testing.do_bench`` median, plus a CUDA-graph replay of ours):

  (a) ours, the engine's step: ``select_scope`` (scorer over the bf16 min/max summaries of
      every candidate chunk, per-head max-normalized combine, radix top-k, scope page
      table: three launches), then ``decode_attention`` over the ~8K-token scope
      [sink | top-k chunks | local window] with RoPE on the fly;
  (b) ``torch`` SDPA full attention over the whole (already rotated) context;
  (c) exact per-token top-k (the original ReAttention decode): q.k over all un-rotated keys,
      top-k tokens per KV head (scores summed over its query heads), gather, rotate to
      virtual positions, attention over the selected tokens;

and the HBM floor of each (bytes it must read / measured device-to-device copy rate, read +
write counted). Before timing it checks every Triton op against its torch reference on the
GPU, and it times one chunked-prefill step. Prints markdown tables.

    python benchmarks/bench_attention.py                      # 32K,128K,1M,4M; ~1-2 min
    python benchmarks/bench_attention.py --contexts 32K,1M --no-check
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from dataclasses import dataclass

import sglang_reattn.kernels as K
import torch
import torch.nn.functional as F
import triton
import triton.testing

S = importlib.import_module("sglang_reattn.kernels.select_scope")  # the module, not the op


@dataclass(frozen=True)
class Shape:
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    chunk: int = 64
    sink: int = 64
    local: int = 2048
    scope: int = 8192
    dtype: torch.dtype = torch.bfloat16

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def topk(self) -> int:  # chunks selected between sink and local window
        return (self.scope - self.sink - self.local) // self.chunk

    @property
    def token_bytes(self) -> int:  # K or V of one token, all KV heads
        return self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def fmt_tokens(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


@contextlib.contextmanager
def knobs(module: str, **values):
    """Module-level knobs of ``sglang_reattn.kernels.<module>`` set for a ``with`` block
    (read at each launch), restored after."""
    g = importlib.import_module(f"sglang_reattn.kernels.{module}").__dict__
    saved = {k: g[k] for k in values}
    g.update(values)
    try:
        yield
    finally:
        g.update(saved)


def bench(fn, rep: int) -> float:
    """Median milliseconds of ``fn`` (events around back-to-back launches)."""
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def bench_graph(fn, rep: int) -> float | str:
    """Median milliseconds of a CUDA-graph replay of ``fn``; the error text if capture fails."""
    # do_bench_cudagraph captures and replays on a stream of its own, which does not wait
    # for the default one: the kernels' resting workspaces must not be in use there. One
    # eager call first grows any workspace outside the capture (knob variants change sizes).
    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as exc:  # report, do not hide: capturability is part of the contract
        return f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy rate in B/s, counting read + write."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep=100)
    return 2 * n / (ms * 1e-3)


# ----------------------------------------------------------------------------- (a) ours


class OursDecode:
    """One layer of the engine's decode step with all of the context's KV in the GPU pool:
    bf16 min/max summaries of every chunk, the fused selection (``select_scope``: scorer,
    per-head max-normalized combine, top-k, scope table), then ``decode_attention``."""

    def __init__(self, ctx: int, s: Shape, cos, sin, device):
        self.s = s
        num_chunks = ctx // s.chunk
        n_sink, n_local = s.sink // s.chunk, s.local // s.chunk
        self.num_cands = num_chunks - n_sink - n_local
        assert self.num_cands >= s.topk, "context shorter than the scope"
        hd = (num_chunks, s.num_kv_heads, s.head_dim)
        self.kmin = torch.randn(hd, device=device, dtype=s.dtype) - 1.0
        self.kmax = self.kmin + torch.rand(hd, device=device, dtype=s.dtype) * 2.0
        shape = (num_chunks, s.chunk, s.num_kv_heads, s.head_dim)  # page = chunk
        self.k_pool = torch.empty(shape, device=device, dtype=s.dtype).normal_()
        self.v_pool = torch.empty(shape, device=device, dtype=s.dtype).normal_()

        def i32(*rows):
            return torch.tensor(rows, device=device, dtype=torch.int32)

        self.cand = torch.arange(n_sink, n_sink + self.num_cands, device=device,
                                 dtype=torch.int32)[None]  # the middle chunks, in order
        self.ncand = i32(self.num_cands)
        self.head_table = torch.arange(n_sink, device=device, dtype=torch.int32)[None]
        self.head_pages = i32(n_sink)
        self.local_table = torch.arange(num_chunks - n_local, num_chunks, device=device,
                                        dtype=torch.int32)[None]
        self.local_tokens = i32(s.local)
        self.q = torch.randn(1, s.num_q_heads, s.head_dim, device=device, dtype=s.dtype)
        self.cos, self.sin = cos, sin

    def select(self, method="radix", spare=0):
        return K.select_scope_triton(
            self.q, self.cand, self.ncand, self.head_table, self.head_pages,
            self.local_table, self.local_tokens, self.s.topk, self.s.chunk, self.kmin,
            self.kmax, None, "max", 1, None, 0, spare, method=method)[:2]

    def select_unfused(self):
        """The previous engine path: scorer, torch combine + top-k, torch table assembly."""
        sel, nsel = K.score_chunks_triton(self.q, self.cand, self.ncand, self.s.topk,
                                          kmin=self.kmin, kmax=self.kmax, combine="max")
        pages = self.cand.gather(1, sel.clamp_min(0).long())
        return K.assemble_scope_ref(self.head_table, self.head_pages, pages, nsel,
                                    self.local_table, self.local_tokens, self.s.chunk)

    def scores(self):
        return K.chunk_scores_triton(self.q, self.cand, self.ncand, kmin=self.kmin,
                                     kmax=self.kmax, per_head=True)

    def attend(self, page_table, scope_lens, num_splits=None):
        return K.decode_attention(self.q, self.k_pool, self.v_pool, page_table, scope_lens,
                                  self.cos, self.sin, self.s.head_dim ** -0.5, num_splits)

    def step(self, method="radix"):
        return self.attend(*self.select(method))

    def step_unfused(self):
        return self.attend(*self.select_unfused())

    def bytes_read(self) -> dict[str, int]:
        s = self.s
        summ = 2 * self.num_cands * s.token_bytes  # kmin + kmax rows of every candidate
        return {"scorer": summ, "attn": 2 * s.scope * s.token_bytes}


# ----------------------------------------------------------------------------- (b), (c)


def sdpa_full(q4, k, v):
    """q4 [1, Hkv, G, D]: decode queries of a GQA group as rows; k, v [1, Hkv, N, D]."""
    return F.scaled_dot_product_attention(q4, k, v)


def token_topk_decode(q4, k, v, s: Shape, cos, sin):
    """Original ReAttention decode: exact top-k tokens per KV head from un-rotated keys."""
    n = k.shape[2]
    k_sel = s.scope - s.sink - s.local
    scores = torch.matmul(q4, k[:, :, s.sink:n - s.local].transpose(-1, -2))  # [1,Hkv,G,Nmid]
    idx = scores.float().sum(2).topk(k_sel, dim=-1).indices.sort(-1).values + s.sink
    dev = k.device
    idx = torch.cat([torch.arange(s.sink, device=dev).expand(1, s.num_kv_heads, -1), idx,
                     torch.arange(n - s.local, n, device=dev).expand(1, s.num_kv_heads, -1)],
                    -1)  # [1, Hkv, scope]
    gather_idx = idx[..., None].expand(-1, -1, -1, s.head_dim)
    ks, vs = k.gather(2, gather_idx), v.gather(2, gather_idx)
    pos = torch.arange(s.scope, device=dev)
    ks = K.apply_rope_ref(ks[0].transpose(0, 1), pos, cos, sin).transpose(0, 1)[None]
    qr = K.apply_rope_ref(q4[0].transpose(0, 1), pos[-1:].expand(s.group), cos, sin)
    qr = qr.transpose(0, 1)[None]
    return F.scaled_dot_product_attention(qr.to(s.dtype), ks.to(s.dtype), vs)


# ----------------------------------------------------------------------------- checks


def check_ops(device) -> list[tuple[str, float, bool]]:
    """Each Triton op against its torch reference on this GPU (small random problems)."""
    g = torch.Generator(device=device).manual_seed(0)
    results = []
    s = Shape()
    cos, sin = K.rope_tables(4096, s.head_dim, base=500000.0, device=device)
    c = 64
    seq = [1, 700, 3000]
    pages = sum(-(-n // c) for n in seq) + 4
    kc = torch.randn(pages, c, s.num_kv_heads, s.head_dim, generator=g, device=device,
                     dtype=s.dtype)
    vc = torch.randn(kc.shape, generator=g, device=device, dtype=s.dtype)
    perm = torch.randperm(pages, generator=g, device=device).int()
    width = max(-(-n // c) for n in seq)
    rows, used = [], 0
    for n in seq:  # distinct shuffled pages per sequence, padded with a spare page
        own = -(-n // c)
        rows.append(torch.cat([perm[used:used + own], perm[-1:].expand(width - own)]))
        used += own
    pt = torch.stack(rows)
    sl = torch.tensor(seq, device=device, dtype=torch.int32)
    q = torch.randn(3, s.num_q_heads, s.head_dim, generator=g, device=device, dtype=s.dtype)
    sc = s.head_dim ** -0.5
    ref = K.decode_attention_ref(q, kc, vc, pt, sl, cos, sin, sc)
    for ns in (None, 1, 5):
        out = K.decode_attention_triton(q, kc, vc, pt, sl, cos, sin, sc, num_splits=ns)
        err = (out.float() - ref.float()).abs().max().item()
        results.append((f"decode_attention (num_splits={ns})", err, err < 4e-2))
    for label, values in (("RoPE by angle addition", dict(DECODE_ROPE_ANGLE=True)),):
        for ns in (None, 1):
            with knobs("decode_attention", **values):
                out = K.decode_attention_triton(q, kc, vc, pt, sl, cos, sin, sc, num_splits=ns)
            err = (out.float() - ref.float()).abs().max().item()
            results.append((f"decode_attention ({label}, num_splits={ns})", err, err < 4e-2))
    q_lens = [1, 300, 1000]
    qp = torch.randn(sum(q_lens), s.num_q_heads, s.head_dim, generator=g, device=device,
                     dtype=s.dtype)
    cu = torch.tensor([0, 1, 301, 1301], device=device, dtype=torch.int32)
    out = K.prefill_attention_triton(qp, kc, vc, pt, sl, cu, 1000, cos, sin, sc)
    ref = K.prefill_attention_ref(qp, kc, vc, pt, sl, cu, 1000, cos, sin, sc)
    err = (out.float() - ref.float()).abs().max().item()
    results.append(("prefill_attention", err, err < 4e-2))
    out = K.prefill_attention_gathered(qp, kc, vc, pt, sl.tolist(), q_lens, cos, sin, sc)
    err = (out.float() - ref.float()).abs().max().item()
    results.append(("prefill_attention_gathered (cuDNN or flash)", err, err < 4e-2))

    slots = torch.cat([torch.arange(5 * c, 5 * c + 150), torch.tensor([-1]),
                       torch.arange(9 * c, 9 * c + 40)]).to(device)
    kn = torch.randn(len(slots), s.num_kv_heads, s.head_dim, generator=g, device=device,
                     dtype=s.dtype)
    states = []
    for fn in (K.store_kv_triton, K.store_kv_ref):
        kc2, vc2 = kc.clone(), vc.clone()
        summ = [torch.zeros(pages, s.num_kv_heads, s.head_dim, device=device) for _ in range(3)]
        fn(kn, kn, kc2, vc2, slots, *summ)
        states.append([kc2, vc2, *summ])
    err = max((a - b).float().abs().max().item() for a, b in zip(*states))
    results.append(("store_kv + summaries", err, err < 1e-4))

    kmin, kmax = states[0][2].to(s.dtype), states[0][3].to(s.dtype)
    cand = torch.randperm(pages, generator=g, device=device).int()[None].expand(3, -1)
    ncand = torch.tensor([0, 7, pages], device=device, dtype=torch.int32)
    for combine in ("sum", "max"):
        a = K.score_chunks_triton(q, cand.contiguous(), ncand, 5, kmin=kmin, kmax=kmax,
                                  combine=combine)
        b = K.score_chunks_ref(q, cand.contiguous(), ncand, 5, kmin=kmin, kmax=kmax,
                               combine=combine)
        same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        results.append((f"score_chunks ({combine})", 0.0 if same else 1.0, same))
    results.extend(check_select_scope(device, g))
    for dtype in (torch.bfloat16, torch.float16):  # the model's fused add + RMSNorm
        x = torch.randn(5, 4096, generator=g, device=device).to(dtype)
        r = torch.randn(5, 4096, generator=g, device=device).to(dtype)
        w = (1 + 0.1 * torch.randn(4096, generator=g, device=device)).to(dtype)
        (o, t), (ro, rt) = K.rms_norm_triton(x, w, 1e-5, r), K.rms_norm_ref(x, w, 1e-5, r)
        err = max((o.float() - ro.float()).abs().max().item(),
                  (t.float() - rt.float()).abs().max().item())
        results.append((f"rms_norm + residual ({dtype})", err, err < 4e-2))
    return results


def check_select_scope(device, g, n: int = 16351) -> list[tuple[str, float, bool]]:
    """The fused selection at a 1M-token context's candidate count against its reference.
    Float sums may round differently on the GPU, so a different choice between near-equal
    scores passes: the error is the largest reference-score gap by which the kernel's worst
    pick falls below the best chunk it left out (0 when the picks are identical)."""
    s, results = Shape(), []
    summ = torch.randn(n + 40, s.num_kv_heads, s.head_dim, generator=g, device=device)
    kmin = (summ - 1).to(s.dtype)
    kmax = (summ + torch.rand(summ.shape, generator=g, device=device)).to(s.dtype)
    cand = torch.randperm(n + 40, generator=g, device=device)[:n].int()[None]
    ncand = torch.tensor([n], device=device, dtype=torch.int32)
    i32 = torch.int32
    scope = (torch.tensor([[0]], device=device, dtype=i32), torch.tensor([1], device=device,
             dtype=i32), torch.arange(n, n + 32, device=device, dtype=i32)[None],
             torch.tensor([2048], device=device, dtype=i32))
    for combine, reps, method, cap, tuned in (
            ("max", 1, "radix", None, False), ("sum", 1, "radix", None, False),
            ("max", 16, "radix", None, False), ("max", 1, "radix", 16, False),
            ("max", 1, "sort", None, False), ("max", 16, "sort", None, False),
            ("max", 1, "radix", None, True), ("max", 16, "radix", None, True)):
        q = torch.randn(reps, s.num_q_heads, s.head_dim, generator=g, device=device,
                        dtype=s.dtype)
        args = (q, cand, ncand, *scope, s.topk, s.chunk, kmin, kmax, None, combine, reps)
        # with cap: few bins, a small rank buffer (the exact-threshold search); tuned: the
        # 8 histogram copies, the scorer a program per block (bench variants)
        with knobs("select_scope", **(dict(SELECT_CAP=cap, SELECT_BINS=32) if cap else {}),
                   **(dict(SELECT_HIST_COPIES=8) if tuned else {})), \
                knobs("score_chunks", **(dict(SCORE_DOT_WAVES=0) if tuned else {})):
            out = K.select_scope_triton(*args, None, 0, 0, method=method)
        ref = K.select_scope_ref(*args)
        scores = K.scope_scores_ref(q, cand, ncand, kmin, kmax, None, combine, reps)[0]
        page_score = torch.full((n + 40,), float("-inf"), device=device)
        page_score[cand[0].long()] = scores
        picked = out[2][0].long()
        left = torch.ones(n + 40, dtype=torch.bool, device=device)
        left[picked] = False
        gap = float((page_score[left].max() - page_score[picked].min()).clamp_min(0))
        position = torch.full((n + 40,), -1, device=device, dtype=torch.long)
        position[cand[0].long()] = torch.arange(n, device=device)
        in_order = bool((position[picked].diff() > 0).all())  # original (context) order
        ok = (int(out[3][0]) == s.topk and in_order and gap <= 1e-5 * float(scores.abs().max())
              and torch.equal(out[1], ref[1]))
        label = (f"{method}{', exact threshold' if cap else ''}"
                 f"{', scorer a program per block, 8 histogram copies' if tuned else ''}")
        results.append((f"select_scope ({combine}, reps {reps}, {n} chunks, {label})", gap, ok))
    return results


def bench_prefill(s: Shape, device, rep: int) -> tuple[float, float]:
    """One chunked-prefill step: 4096 new tokens at the end of an 8192-token scope."""
    scope = s.scope
    new = min(4096, scope // 2)
    pages = scope // s.chunk
    shape = (pages, s.chunk, s.num_kv_heads, s.head_dim)
    kc = torch.randn(shape, device=device, dtype=s.dtype)
    vc = torch.randn(shape, device=device, dtype=s.dtype)
    pt = torch.randperm(pages, device=device).int()[None]
    sl = torch.tensor([scope], device=device, dtype=torch.int32)
    cu = torch.tensor([0, new], device=device, dtype=torch.int32)
    q = torch.randn(new, s.num_q_heads, s.head_dim, device=device, dtype=s.dtype)
    cos, sin = K.rope_tables(scope, s.head_dim, device=device)
    ms = bench(lambda: K.prefill_attention(q, kc, vc, pt, sl, cu, new, cos, sin, 0.088), rep)
    visible = new * (scope - new) + new * (new + 1) / 2
    flops = 4 * s.num_q_heads * s.head_dim * visible
    return ms, flops / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- main


def fmt_us(ms) -> str:
    if not isinstance(ms, float):
        return str(ms)
    return f"{ms * 1e3:,.1f}" if ms < 0.1 else f"{ms * 1e3:,.0f}"


def ratio(a, b) -> str:
    return f"{a / b:,.1f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def time_ours(ctx: int, s: Shape, bw: float, rep: int, cos, sin, device) -> dict:
    ours = OursDecode(ctx, s, cos, sin, device)
    t0 = time.perf_counter()
    tables = ours.select()  # first call: compiles the selection kernels for this shape
    torch.cuda.synchronize()
    b = ours.bytes_read()
    row = {
        "first_call_s": time.perf_counter() - t0,
        "cands": ours.num_cands,
        "scorer": bench(ours.select, rep),
        "attn": bench(lambda: ours.attend(*tables), rep),
        "ours": bench(ours.step, rep),
        "ours_graph": bench_graph(ours.step, rep),
        "unfused_graph": bench_graph(ours.step_unfused, rep),
        # the step cut at each stage, each replayed as its own CUDA graph
        "g_scores": bench_graph(ours.scores, rep),
        "g_select": bench_graph(ours.select, rep),
        "g_attn": bench_graph(lambda: ours.attend(*tables), rep),
        "ours_floor": (b["scorer"] + b["attn"]) / bw * 1e3,
        "scorer_floor": b["scorer"] / bw * 1e3,
        "attn_floor": b["attn"] / bw * 1e3,
    }
    if ctx == 1 << 20:  # decode over the same 8K scope: tiles, warps, stages, splits
        for cfg in DECODE_CONFIGS:
            block_n, warps, stages, splits = cfg
            with knobs("decode_attention", DECODE_BLOCK_N=block_n, DECODE_WARPS=warps,
                       DECODE_STAGES=stages):
                row["g_attn_" + "_".join(map(str, cfg))] = bench_graph(
                    lambda n=splits: ours.attend(*tables, num_splits=n), rep)
    for label, settings in STEP_VARIANTS:  # A/Bs of the whole step (and of its selection)
        with contextlib.ExitStack() as stack:
            for module, values in settings.items():
                stack.enter_context(knobs(module, **values))
            row[f"variant_step {label}"] = bench_graph(ours.step, rep)
            row[f"variant_select {label}"] = bench_graph(ours.select, rep)
    row["kernels"] = kernel_times(ours.step)
    # the previous top-k (sorting networks over blocks of candidates), and 32 runners-up
    row["g_select_sort"] = bench_graph(lambda: ours.select("sort"), rep)
    row["sort_graph"] = bench_graph(lambda: ours.step("sort"), rep)
    row["g_select_spare"] = bench_graph(lambda: ours.select("radix", 32), rep)
    if ctx >= 1 << 20:  # the scorer's candidates per program, warps and grid order
        for cfg in SCORER_CONFIGS:
            bn, warps, waves, stages = cfg
            with knobs("score_chunks", SCORE_DOT_BLOCK_N=bn, SCORE_DOT_WARPS=warps,
                       SCORE_DOT_WAVES=waves, SCORE_DOT_STAGES=stages):
                row["g_scores_" + "_".join(map(str, cfg))] = bench_graph(ours.scores, rep)
    return row


def kernel_times(fn, steps: int = 20) -> list[tuple[str, float]]:
    """Device time of each kernel of ``fn`` (eager launches, torch profiler), us per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            out.append((e.key, t / steps))
    return sorted(out, key=lambda kv: -kv[1])


# decode attention: keys per tile, warps, stages, splits (None: the default count)
DECODE_CONFIGS = ((64, 4, 2, None), (64, 4, 2, 64), (64, 2, 2, None), (32, 4, 2, 64),
                  (128, 8, 2, 32))
# the per-head (matrix-product) scorer: candidates per program, warps, looping programs per
# SM (0: a program per block), stages (the engine's: 64, 4, 4, 3)
SCORER_CONFIGS = ((64, 4, 0, 3), (64, 4, 2, 3), (64, 4, 4, 3), (64, 4, 4, 1), (64, 4, 4, 2),
                  (64, 8, 4, 3), (128, 8, 4, 3), (32, 4, 8, 3))
# the whole step with other kernel settings: label, {kernels module: {knob: value}}
STEP_VARIANTS = (
    ("keys rotated by angle addition", {"decode_attention": dict(DECODE_ROPE_ANGLE=True)}),
    ("1 histogram copy", {"select_scope": dict(SELECT_HIST_COPIES=1)}),
    ("8 histogram copies", {"select_scope": dict(SELECT_HIST_COPIES=8)}),
    ("scorer: a program per block", {"score_chunks": dict(SCORE_DOT_WAVES=0)}),
)


def time_full(ctx: int, s: Shape, bw: float, rep: int, cos, sin, device) -> dict:
    row = {"sdpa_floor": 2 * ctx * s.token_bytes / bw * 1e3,
           "topk_floor": (ctx * s.token_bytes + 2 * s.scope * s.token_bytes) / bw * 1e3}
    kv_shape = (1, s.num_kv_heads, ctx, s.head_dim)
    k = torch.randn(kv_shape, device=device, dtype=s.dtype)
    v = torch.randn(kv_shape, device=device, dtype=s.dtype)
    q4 = torch.randn(1, s.num_kv_heads, s.group, s.head_dim, device=device, dtype=s.dtype)
    for key, fn in (("sdpa", lambda: sdpa_full(q4, k, v)),
                    ("topk", lambda: token_topk_decode(q4, k, v, s, cos, sin))):
        try:
            row[key] = bench(fn, rep)
        except torch.cuda.OutOfMemoryError:
            row[key] = "OOM"
        torch.cuda.empty_cache()
    return row


def run_context(ctx: int, s: Shape, bw: float, rep: int, device, free_gib: float) -> dict:
    cos, sin = K.rope_tables(s.scope, s.head_dim, base=500000.0, device=device)
    row: dict = {"ctx": ctx, **time_ours(ctx, s, bw, rep, cos, sin, device)}
    torch.cuda.empty_cache()
    kv_gib = 2 * ctx * s.token_bytes / 2**30
    if 1.3 * kv_gib > free_gib:  # K + V (+ scratch of the scan)
        row["sdpa"] = row["topk"] = f"skip ({kv_gib:.0f} GiB KV)"
        return row
    try:
        row.update(time_full(ctx, s, bw, rep, cos, sin, device))
    except torch.cuda.OutOfMemoryError:
        row["sdpa"] = row["topk"] = "OOM"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="32K,128K,1M,4M")
    ap.add_argument("--rep", type=int, default=60, help="do_bench repetition time, ms")
    ap.add_argument("--no-check", action="store_true", help="skip the GPU correctness checks")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()
    s = Shape()
    name = torch.cuda.get_device_name(device)
    print(f"# bench_attention on {name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"Llama-3.1-8B layer: {s.num_q_heads} q heads, {s.num_kv_heads} KV heads, "
          f"D {s.head_dim}, bf16, batch 1; scope = sink {s.sink} + top-{s.topk} chunks of "
          f"{s.chunk} + local {s.local} = {s.scope} tokens\n")

    if not args.no_check:
        print("| check vs torch reference | max abs err | ok |\n| --- | --- | --- |")
        for label, err, ok in check_ops(device):
            print(f"| {label} | {err:.2e} | {'PASS' if ok else 'FAIL'} |")
        print()

    bw = copy_bandwidth(device)
    print(f"measured device-to-device copy: {bw / 1e12:.2f} TB/s (read + write); floors below "
          "= bytes that must be read / this rate\n")

    rows = []
    for ctx in (parse_size(c) for c in args.contexts.split(",")):
        torch.cuda.empty_cache()
        free_gib = torch.cuda.mem_get_info(device)[0] / 2**30
        try:
            rows.append(run_context(ctx, s, bw, args.rep, device, free_gib))
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"ctx": ctx, "error": f"OOM: {str(exc).splitlines()[0][:60]}"})
        print(f"# {fmt_tokens(ctx)} done at {time.time() - t0:.0f} s: "
              + ", ".join(f"{k} {v * 1e3:.1f} us" if isinstance(v, float) and k != "first_call_s"
                          else f"{k} {v}" for k, v in rows[-1].items()
                          if k not in ("ctx", "kernels")),
              flush=True)
        torch.cuda.empty_cache()

    print("| context | chunks scored | (a) scorer+top-k us | (a) scope attn us | (a) total us "
          "| (a) CUDA graph us | (a) floor us | (b) SDPA full us | (b) floor us "
          "| (c) token top-k us | (c) floor us | (b)/(a) | (c)/(a) |")
    print("| " + " | ".join(["---"] * 13) + " |")
    for r in rows:
        if "error" in r:
            print(f"| {fmt_tokens(r['ctx'])} | {r['error']} |" + " |" * 11)
            continue
        best = r["ours_graph"] if isinstance(r["ours_graph"], float) else r["ours"]
        print(f"| {fmt_tokens(r['ctx'])} | {r['cands']:,} | {fmt_us(r['scorer'])} "
              f"| {fmt_us(r['attn'])} | {fmt_us(r['ours'])} | {fmt_us(r['ours_graph'])} "
              f"| {fmt_us(r['ours_floor'])} | {fmt_us(r['sdpa'])} "
              f"| {fmt_us(r.get('sdpa_floor', '-'))} | {fmt_us(r['topk'])} "
              f"| {fmt_us(r.get('topk_floor', '-'))} | {ratio(r['sdpa'], best)} "
              f"| {ratio(r['topk'], best)} |")
    print("\n(a) total = scorer + top-k + scope table + decode, launched eagerly; the CUDA-graph "
          "column replays the same step (what the engine runs). Ratios use the graph time.\n")
    print("CUDA-graph replay of the step cut at each stage (us); the selection is the fused "
          "scorer + combine + top-k + scope table, the unfused step is the previous engine "
          "path (scorer, then torch combine, top-k and table):\n")
    print("| context | scores kernel | selection | + 32 runners-up | decode alone | whole step "
          "| floor | step / floor | sort top-k: selection | sort top-k: whole step "
          "| unfused step |")
    print("| " + " | ".join(["---"] * 11) + " |")
    for r in (r for r in rows if "error" not in r):
        print(f"| {fmt_tokens(r['ctx'])} | {fmt_us(r['g_scores'])} | {fmt_us(r['g_select'])} "
              f"| {fmt_us(r['g_select_spare'])} | {fmt_us(r['g_attn'])} "
              f"| {fmt_us(r['ours_graph'])} | {fmt_us(r['ours_floor'])} "
              f"| {ratio(r['ours_graph'], r['ours_floor'])} | {fmt_us(r['g_select_sort'])} "
              f"| {fmt_us(r['sort_graph'])} | {fmt_us(r['unfused_graph'])} |")
    print("\nthe step with other kernel settings (CUDA graph, us: selection / whole step; the "
          "engine's settings above):\n")
    print("| context | " + " | ".join(label for label, _ in STEP_VARIANTS) + " |")
    print("| " + " | ".join(["---"] * (1 + len(STEP_VARIANTS))) + " |")
    for r in (r for r in rows if "error" not in r):
        print(f"| {fmt_tokens(r['ctx'])} | " + " | ".join(
            f"{fmt_us(r[f'variant_select {label}'])} / {fmt_us(r[f'variant_step {label}'])}"
            for label, _ in STEP_VARIANTS) + " |")
    print()
    for r in (r for r in rows if "g_attn_64_4_2_None" in r):
        print(f"decode attention over the 8K scope at {fmt_tokens(r['ctx'])} (CUDA graph, us; "
              f"floor {fmt_us(r['attn_floor'])}) by keys per tile / warps / stages / splits:\n")
        print("| " + " | ".join(" / ".join(map(str, c)) for c in DECODE_CONFIGS) + " |")
        print("| " + " | ".join(["---"] * len(DECODE_CONFIGS)) + " |")
        print("| " + " | ".join(fmt_us(r["g_attn_" + "_".join(map(str, c))])
                                for c in DECODE_CONFIGS) + " |\n")
    print("device time of each kernel of the step (eager launches, torch profiler, us):\n")
    for r in (r for r in rows if "kernels" in r):
        print(f"- {fmt_tokens(r['ctx'])}: " + ", ".join(
            f"{name[:40]} {t:.1f}" for name, t in r["kernels"]))
    print()
    sweep = [r for r in rows if "g_scores_64_4_0_3" in r]
    if sweep:
        print("per-head scores kernel (matrix products; CUDA graph, us) by candidates per "
              "program / warps / looping programs per SM (0: one per block) / stages; floor = "
              "the summaries' bytes / copy rate:\n")
        print("| context | floor | " + " | ".join(
            " / ".join(map(str, cfg)) for cfg in SCORER_CONFIGS)
            + " |")
        print("| " + " | ".join(["---"] * (2 + len(SCORER_CONFIGS))) + " |")
        for r in sweep:
            print(f"| {fmt_tokens(r['ctx'])} | {fmt_us(r['scorer_floor'])} | " + " | ".join(
                fmt_us(r["g_scores_" + "_".join(map(str, cfg))]) for cfg in SCORER_CONFIGS)
                + " |")
        print()

    ms, tflops = bench_prefill(s, device, args.rep)
    print(f"prefill_attention, {min(4096, s.scope // 2)} new tokens at the end of an "
          f"{s.scope}-token scope: "
          f"{ms * 1e3:,.0f} us, {tflops:.0f} TFLOP/s (causal FLOPs)")
    print(f"\ntotal benchmark time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
