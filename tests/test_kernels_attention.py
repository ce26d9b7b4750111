"""Decode and prefill attention: Triton (interpreter) vs torch reference vs plain full attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sglang_reattn.kernels import HAS_TRITON, apply_rope_ref, rope_tables
from sglang_reattn.kernels.testing import load_interpreted_kernels

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

# An interpreted copy of the package: TRITON_INTERPRET=1 is set only while these tests run
# (fixture below), so other test modules keep the normal dispatch (see kernels/testing.py).
K = load_interpreted_kernels() if HAS_TRITON else None


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}
MAX_POS = 512


def _make_paged(seq_lens, page_size, num_kv_heads, head_dim, dtype, gen):
    """Random contiguous K/V per sequence, scattered over shuffled pages of a NaN-filled pool.

    Returns (k_cache, v_cache, page_table, scope_lens, ks, vs) with ks[b] = [n_b, Hkv, D].
    Unused slots and padding entries of the page table point at NaN, so a kernel reading
    outside a scope poisons its output.
    """
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages_per_seq) + 2  # + a poison page and a spare
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    perm = torch.randperm(num_pages, generator=gen)
    poison = int(perm[-1])
    max_pages = max(pages_per_seq + [1]) + 1  # one padding column at least
    page_table = torch.full((len(seq_lens), max_pages), poison, dtype=torch.int32)
    ks, vs, used = [], [], 0
    for b, n in enumerate(seq_lens):
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pages = perm[used:used + pages_per_seq[b]]
        used += pages_per_seq[b]
        page_table[b, :len(pages)] = pages.int()
        for i, p in enumerate(pages.tolist()):
            chunk = slice(i * page_size, min((i + 1) * page_size, n))
            k_cache[p, :chunk.stop - chunk.start] = k[chunk]
            v_cache[p, :chunk.stop - chunk.start] = v[chunk]
        ks.append(k)
        vs.append(v)
    return k_cache, v_cache, page_table, torch.tensor(seq_lens, dtype=torch.int32), ks, vs


def _rope_hf(x, pos, cos, sin):
    """HF-style rotation, written independently of the kernels: x*cos + rotate_half(x)*sin."""
    c = torch.cat([cos[pos], cos[pos]], -1)[:, None, :]  # [n, 1, D]
    s = torch.cat([sin[pos], sin[pos]], -1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x.float() * c + rotated.float() * s


def _full_attention(q, k, v, q_pos, cos, sin, sm_scale):
    """Plain SDPA over contiguous un-rotated q [m, Hq, D], k/v [n, Hkv, D]; causal by position."""
    group = q.shape[1] // k.shape[1]
    n = k.shape[0]
    qr = _rope_hf(q, q_pos, cos, sin).transpose(0, 1)  # [Hq, m, D]
    kr = _rope_hf(k, torch.arange(n), cos, sin).repeat_interleave(group, 1).transpose(0, 1)
    vr = v.float().repeat_interleave(group, 1).transpose(0, 1)
    mask = torch.arange(n)[None, :] <= q_pos[:, None]  # [m, n]
    out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=sm_scale)
    return out.transpose(0, 1)  # [m, Hq, D]


@pytest.fixture(scope="module")
def tables():
    return {d: rope_tables(MAX_POS, d) for d in (64, 128)}


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (3, 3), (1, 4), (2, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("angle", [False, True])
def test_decode_triton_matches_ref(num_kv_heads, group, head_dim, dtype, angle, tables,
                                   monkeypatch):
    """Also with DECODE_ROPE_ANGLE: keys rotated by the angle-addition identities from each
    tile's first position (split slices start mid-table: 64, 128)."""
    monkeypatch.setitem(K.decode_attention_triton.__globals__, "DECODE_ROPE_ANGLE", angle)
    gen = torch.Generator().manual_seed(1000 * group + head_dim)
    page_size = 7
    # empty scope, one token, exactly one page, partial last page, several tiles
    seq_lens = [0, 1, page_size, 2 * page_size + 3, 150]
    kc, vc, pt, sl, _, _ = _make_paged(seq_lens, page_size, num_kv_heads, head_dim, dtype, gen)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    cos, sin = tables[head_dim]
    scale = head_dim ** -0.5
    ref = K.decode_attention_ref(q, kc, vc, pt, sl, cos, sin, scale)
    assert torch.isfinite(ref).all()
    for num_splits in (1, 3):
        out = K.decode_attention_triton(q, kc, vc, pt, sl, cos, sin, scale, num_splits=num_splits)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out, ref, **TOL[dtype])
        assert (out[0] == 0).all(), "an empty scope must give a zero row"


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_decode_page_sizes_and_default_splits(page_size, tables):
    gen = torch.Generator().manual_seed(page_size)
    seq_lens = [1, 200, 65, 64]
    kc, vc, pt, sl, _, _ = _make_paged(seq_lens, page_size, 2, 64, torch.float16, gen)
    # q as the engine gets it: a strided slice of a fused qkv projection
    q = torch.randn(4, 12, 64, generator=gen).half()[:, :8]
    assert not q.is_contiguous()
    cos, sin = tables[64]
    ref = K.decode_attention_ref(q, kc, vc, pt, sl, cos, sin, 0.125)
    for num_splits in (None, 7):  # 7 splits > tiles of most rows: empty splits
        out = K.decode_attention_triton(q, kc, vc, pt, sl, cos, sin, 0.125, num_splits=num_splits)
        torch.testing.assert_close(out, ref, **TOL[torch.float16])



@pytest.mark.parametrize("group", [1, 3, 4])
def test_decode_ref_equals_full_attention(group, tables):
    """Whole context in scope -> ordinary attention at the last position, exactly."""
    gen = torch.Generator().manual_seed(7 + group)
    seq_lens = [1, 37, 100]
    kc, vc, pt, sl, ks, vs = _make_paged(seq_lens, 16, 2, 64, torch.float32, gen)
    q = torch.randn(3, 2 * group, 64, generator=gen)
    cos, sin = tables[64]
    out = K.decode_attention_ref(q, kc, vc, pt, sl, cos, sin, 0.125)
    out_triton = K.decode_attention(q, kc, vc, pt, sl, cos, sin, 0.125)  # dispatcher -> Triton
    for b, n in enumerate(seq_lens):
        full = _full_attention(q[b:b + 1], ks[b], vs[b], torch.tensor([n - 1]), cos, sin, 0.125)
        torch.testing.assert_close(out[b], full[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_triton[b], full[0], atol=1e-4, rtol=1e-4)


def test_rope_relative_property(tables):
    """rot(q, p+s).rot(k, s) depends only on p: RoPE tables/rotation are self-consistent."""
    cos, sin = tables[64]
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 64, generator=gen), torch.randn(1, 1, 64, generator=gen)
    dots = [(apply_rope_ref(q, torch.tensor([5 + s]), cos, sin)
             * apply_rope_ref(k, torch.tensor([s]), cos, sin)).sum() for s in (0, 17, 300)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(apply_rope_ref(q, torch.tensor([9]), cos, sin),
                               _rope_hf(q, torch.tensor([9]), cos, sin))
    assert not torch.allclose(dots[0], (q * k).sum())  # the rotation is not the identity


def test_decode_rejects_bad_inputs(tables):
    cos, sin = tables[64]
    kc = torch.zeros(4, 8, 2, 64)
    pt, sl = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        K.decode_attention_triton(torch.zeros(1, 3, 64), kc, kc, pt, sl, cos, sin, 1.0)
    with pytest.raises(ValueError, match="page_table must be int32"):
        K.decode_attention_triton(torch.zeros(1, 4, 64), kc, kc, pt.long(), sl, cos, sin, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        K.decode_attention_triton(torch.zeros(1, 4, 64).bfloat16(), kc, kc, pt, sl, cos, sin, 1.0)


# ----------------------------------------------------------------------------- prefill


def _prefill_inputs(q_lens, scope_lens, page_size, num_kv_heads, group, head_dim, dtype, gen):
    kc, vc, pt, sl, ks, vs = _make_paged(scope_lens, page_size, num_kv_heads, head_dim, dtype,
                                         gen)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, kc, vc, pt, sl, cu, ks, vs


@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (1, 3), (2, 4), (1, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_triton_matches_ref(num_kv_heads, group, head_dim, dtype, tables):
    gen = torch.Generator().manual_seed(2000 * group + head_dim)
    # one token; extend after a long scope; empty q; whole-scope causal prefill; partial page
    q_lens = [1, 70, 0, 33, 5]
    scope_lens = [1, 150, 5, 33, 12]
    q, kc, vc, pt, sl, cu, _, _ = _prefill_inputs(q_lens, scope_lens, 7, num_kv_heads, group,
                                                  head_dim, dtype, gen)
    cos, sin = tables[head_dim]
    scale = head_dim ** -0.5
    out = K.prefill_attention_triton(q, kc, vc, pt, sl, cu, max(q_lens), cos, sin, scale)
    ref = K.prefill_attention_ref(q, kc, vc, pt, sl, cu, max(q_lens), cos, sin, scale)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("group", [1, 3])
def test_prefill_ref_equals_full_attention(group, tables):
    gen = torch.Generator().manual_seed(11 + group)
    q_lens, scope_lens = [4, 40, 1], [4, 100, 64]
    q, kc, vc, pt, sl, cu, ks, vs = _prefill_inputs(q_lens, scope_lens, 16, 2, group, 64,
                                                    torch.float32, gen)
    cos, sin = tables[64]
    out = K.prefill_attention_ref(q, kc, vc, pt, sl, cu, 40, cos, sin, 0.125)
    for b, (m, n) in enumerate(zip(q_lens, scope_lens)):
        t0 = int(cu[b])
        full = _full_attention(q[t0:t0 + m], ks[b], vs[b], torch.arange(n - m, n), cos, sin,
                               0.125)
        torch.testing.assert_close(out[t0:t0 + m], full, atol=1e-5, rtol=1e-5)


def test_prefill_last_token_equals_decode(tables):
    """A prefill of one token per sequence is exactly a decode step."""
    gen = torch.Generator().manual_seed(5)
    scope_lens = [9, 130, 1]
    q, kc, vc, pt, sl, cu, _, _ = _prefill_inputs([1, 1, 1], scope_lens, 8, 2, 4, 64,
                                                  torch.float32, gen)
    cos, sin = tables[64]
    pre = K.prefill_attention_triton(q, kc, vc, pt, sl, cu, 1, cos, sin, 0.125)
    dec = K.decode_attention_triton(q, kc, vc, pt, sl, cos, sin, 0.125, num_splits=2)
    torch.testing.assert_close(pre, dec, atol=1e-5, rtol=1e-5)


def test_non_power_of_two_head_dim(tables):
    """head_dim 96 (half 48): padded, masked channels in both kernels."""
    gen = torch.Generator().manual_seed(96)
    cos, sin = K.rope_tables(MAX_POS, 96)
    q_lens, scope_lens = [3, 20], [50, 20]
    q, kc, vc, pt, sl, cu, _, _ = _prefill_inputs(q_lens, scope_lens, 16, 2, 2, 96,
                                                  torch.float32, gen)
    scale = 96 ** -0.5
    torch.testing.assert_close(
        K.prefill_attention_triton(q, kc, vc, pt, sl, cu, 20, cos, sin, scale),
        K.prefill_attention_ref(q, kc, vc, pt, sl, cu, 20, cos, sin, scale), **TOL[torch.float32])
    qd = q[:2].contiguous()
    torch.testing.assert_close(
        K.decode_attention_triton(qd, kc, vc, pt, sl, cos, sin, scale, num_splits=2),
        K.decode_attention_ref(qd, kc, vc, pt, sl, cos, sin, scale), **TOL[torch.float32])


# ----------------------------------------------------------------------------- gathered


@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (1, 4), (1, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_gathered_matches_ref(num_kv_heads, group, head_dim, dtype, tables):
    """The long-query route: Triton gather + rotation of each scope (interpreter), then
    SDPA with a bottom-right causal mask; odd lengths, an empty query block, a whole-scope
    prefill, partial pages."""
    gen = torch.Generator().manual_seed(3000 * group + head_dim)
    q_lens = [70, 0, 33, 1]
    scope_lens = [150, 5, 33, 9]
    q, kc, vc, pt, sl, cu, _, _ = _prefill_inputs(q_lens, scope_lens, 7, num_kv_heads, group,
                                                  head_dim, dtype, gen)
    cos, sin = tables[head_dim]
    scale = head_dim ** -0.5
    out = K.prefill_attention_gathered(q, kc, vc, pt, scope_lens, q_lens, cos, sin, scale)
    ref = K.prefill_attention_ref(q, kc, vc, pt, sl, cu, max(q_lens), cos, sin, scale)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_gather_rope_scope_layout(tables):
    """Keys gathered through the page table and rotated at positions 0..n-1, values as
    stored, queries rotated at the scope's last positions; each [H, L, D]."""
    gen = torch.Generator().manual_seed(77)
    q, kc, vc, pt, _, _, ks, vs = _prefill_inputs([5], [37], 8, 2, 3, 64, torch.float32, gen)
    cos, sin = tables[64]
    qr, kr, v = K.gather_rope_scope(q, kc, vc, pt[0], 37, cos, sin)
    assert qr.shape == (6, 5, 64) and kr.shape == (2, 37, 64) and v.shape == (2, 37, 64)
    torch.testing.assert_close(kr, _rope_hf(ks[0], torch.arange(37), cos, sin).transpose(0, 1))
    torch.testing.assert_close(v, vs[0].transpose(0, 1))
    torch.testing.assert_close(qr, _rope_hf(q, torch.arange(32, 37), cos, sin).transpose(0, 1))


def test_prefill_gathered_rejects_bad_lengths(tables):
    gen = torch.Generator().manual_seed(78)
    q, kc, vc, pt, _, _, _, _ = _prefill_inputs([5], [37], 8, 2, 1, 64, torch.float32, gen)
    cos, sin = tables[64]
    with pytest.raises(ValueError, match="scope of 4 tokens for 5 queries"):
        K.prefill_attention_gathered(q, kc, vc, pt, [4], [5], cos, sin, 0.125)
    with pytest.raises(ValueError, match="sum to q's tokens"):
        K.prefill_attention_gathered(q, kc, vc, pt, [37], [4], cos, sin, 0.125)


def test_merge_lse_of_two_key_blocks_is_the_whole_attention():
    """The cuDNN route's merge: attention over keys [0, m) and over [m, n), each with its
    log-sum-exp, combine into the attention over all n keys (causal inside the second)."""
    from sglang_reattn.kernels.prefill_attention import _merge_lse

    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 4, s, 32, generator=gen) for s in (6, 20, 20))
    scores = (q @ k.transpose(-1, -2)) * 0.2
    scores[..., 14:] = scores[..., 14:].masked_fill(
        torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))  # bottom-right causal
    whole = scores.softmax(-1) @ v

    def part(s, vv):
        return s.softmax(-1) @ vv, s.logsumexp(-1)
    merged = _merge_lse(*part(scores[..., :14], v[:, :, :14]),
                        *part(scores[..., 14:], v[:, :, 14:]))
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_lse_triton_matches_torch(dtype):
    """The one-launch merge (interpreter) against the torch ops: strided [1, H, L, D]
    inputs (head-major and token-major underneath), LSEs with a trailing unit dim, a row
    block past L."""
    from sglang_reattn.kernels.prefill_attention import _merge_lse

    gen = torch.Generator().manual_seed(9)
    h, n, d = 3, 45, 64
    o1 = torch.randn(1, h, n, d, generator=gen).to(dtype)
    o2 = torch.randn(1, n, h, d, generator=gen).to(dtype).transpose(1, 2)
    l1 = 3 * torch.randn(1, h, n, 1, generator=gen)
    l2 = 3 * torch.randn(1, h, n, generator=gen)
    out = K.merge_lse_triton(o1, l1, o2, l2)
    ref = _merge_lse(o1, l1, o2, l2)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out[0].transpose(0, 1).is_contiguous()  # token-major rows, as o_proj reads them
    torch.testing.assert_close(out, ref, **TOL[dtype])
