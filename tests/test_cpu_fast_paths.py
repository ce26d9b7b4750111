"""The CPU decode fast paths against plain references: keys kept rotated at their real
positions, the half-precision decode attention, and `--quantization gguf` (4-bit blocks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sglang_reattn import Engine
from sglang_reattn.config import EngineArgs
from sglang_reattn.errors import InvalidArgument
from sglang_reattn.layers.attention import KVPool, PagedAttention, write_slots
from sglang_reattn.layers.quant import GROUP, Int4Blocks, QuantLinear, int4_supported
from sglang_reattn.models.rope import RopeTable

needs_int4 = pytest.mark.skipif(not int4_supported(), reason="torch without CPU int4 matmul")


def _attention(dtype, seed, heads_first=False):
    g = torch.Generator().manual_seed(seed)
    c, hkv, d = 8, 2, 16
    pool = KVPool(1, 24, c, hkv, d, dtype, torch.device("cpu"), heads_first=heads_first)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g))
    rope = RopeTable(d, 10000.0, None, torch.device("cpu"), initial=64)
    attn = PagedAttention(pool, rope, 8, d, rot_limit=64)
    # Three sequences over shuffled pages, lengths not multiples of the page size.
    perm = (torch.randperm(23, generator=g) + 1).tolist()
    lens = [5, 37, 61]
    pages, i = [], 0
    for n in lens:
        k = (n + c - 1) // c
        pages.append(perm[i:i + k])
        i += k
    idx = [torch.tensor(p) for p in pages]
    q = torch.randn(3, 8, d, generator=g).to(dtype)
    return attn, pool, pages, idx, lens, q


def _reference(attn, pool, idx, lens, q):
    out = []
    for b, (p, n) in enumerate(zip(idx, lens)):
        keys = pool.k[0][p].flatten(0, 1)[:n].float()
        vals = pool.v[0][p].flatten(0, 1)[:n].float()
        out.append(attn.attend(q[b:b + 1].float(), keys, vals))
    return torch.cat(out)


@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_rotated_keys_matches_reference(dtype, heads_first):
    attn, pool, pages, idx, lens, q = _attention(dtype, seed=1, heads_first=heads_first)
    assert (attn._rot[0].permute(2, 0, 1, 3).is_contiguous() == heads_first
            == pool.v[0].permute(2, 0, 1, 3).is_contiguous())
    ref = _reference(attn, pool, idx, lens, q)
    plain = attn._torch_decode(q, pool.k[0], pool.v[0], idx, lens)
    # Every page starts stale (-1): one pass rotates them, for their chunk index.
    attn._fresh_rotations(pages, q.device)
    assert all(attn._rot_base[p] == i for row in pages for i, p in enumerate(row))
    rotated = attn._torch_decode(q, pool.k[0], pool.v[0], idx, lens, attn._rot[0])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(plain.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(rotated.float(), ref, atol=tol, rtol=tol)
    # A page reloaded from elsewhere is invalidated and re-rotated on the next check.
    page = pages[2][3]
    pool.k[0, page] = torch.randn(pool.k.shape[2:]).to(dtype)
    attn.pages_loaded(torch.tensor([page]))
    assert attn._rot_base[page] == -1
    attn._fresh_rotations(pages, q.device)
    rotated = attn._torch_decode(q, pool.k[0], pool.v[0], idx, lens, attn._rot[0])
    torch.testing.assert_close(rotated.float(), _reference(attn, pool, idx, lens, q),
                               atol=tol, rtol=tol)


def test_heads_first_pool_holds_the_same_slots():
    """Both pool layouts index alike: the same slot writes give the same [L, P, C, Hkv, D]."""
    g = torch.Generator().manual_seed(5)
    pools = [KVPool(2, 6, 4, 3, 8, torch.float32, torch.device("cpu"), heads_first=h)
             for h in (False, True)]
    assert pools[1].k.stride(3) == 6 * 4 * 8  # heads outermost within a layer
    slots = torch.tensor([5, 0, 23, 9, 14])
    for layer in range(2):
        x = torch.randn(5, 3, 8, generator=g)
        for pool in pools:
            write_slots(pool.k[layer], slots, x)
            write_slots(pool.v[layer], slots, 2 * x)
    assert torch.equal(pools[0].k, pools[1].k) and torch.equal(pools[0].v, pools[1].v)
    assert torch.equal(pools[1].k[1, 3, 2], x[4])  # slot 14 = page 3, offset 2


def _random_blocks(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = torch.rand(n, k // GROUP, generator=g) * 0.02 + 1e-3
    zero = torch.randn(n, k // GROUP, generator=g) * 0.05
    return Int4Blocks(codes, scale, zero)


@needs_int4
@pytest.mark.parametrize("rows", [1, 3, 8, 20])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_matches_dequantized_matmul(rows, bias):
    n, k = 48, 3 * GROUP
    blocks = _random_blocks(n, k, seed=rows)
    dense = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    lin = QuantLinear(dense, blocks, max_rows=8)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ref = x.float() @ blocks.dequantize().t()
    if bias:
        ref = ref + dense.bias.float()
    y = lin(x)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    # bfloat16 activations, scales and zeros: about 3 significant digits.
    torch.testing.assert_close(y.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.03)
    with pytest.raises(ValueError):
        QuantLinear(nn.Linear(k, n + 1).to(torch.bfloat16), blocks)


@needs_int4
def test_gguf_blocks_equal_the_files_dequantized_weights():
    from sglang_reattn.models.loader import default_gguf_path, read_gguf, read_gguf_int4

    path = default_gguf_path()
    blocks = read_gguf_int4(path)
    _, dense = read_gguf(path)
    assert len(blocks) == 7 * 30  # every linear layer of the default model is Q4_1
    # q/k rows are un-permuted exactly like the dequantized path does.
    for name in ("model.layers.0.self_attn.q_proj.weight",
                 "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        torch.testing.assert_close(blocks[name].dequantize(), dense[name], atol=0, rtol=0)


def test_quantization_flags_are_checked(tiny_llama):
    with pytest.raises(InvalidArgument, match="--quantization"):
        EngineArgs(quantization="awq")
    with pytest.raises(InvalidArgument, match="bfloat16"):
        EngineArgs(quantization="gguf", dtype="float32")
    with pytest.raises(InvalidArgument, match="CPU"):
        EngineArgs(quantization="gguf", device="cuda")
    if int4_supported():
        with pytest.raises(InvalidArgument, match=".gguf"):
            Engine(tiny_llama, device="cpu", quantization="gguf", log_level="warning")


@needs_int4
def test_quantized_engine_follows_the_dense_model():
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    outs = {}
    for name, flags in (("dense", {"dtype": "bfloat16"}), ("q4", {"quantization": "gguf"})):
        with Engine(device="cpu", log_level="warning", **flags) as eng:
            outs[name] = [o["output_ids"] for o in eng.generate(prompts, params)]
            if name == "q4":
                assert eng.dtype == torch.bfloat16
                assert isinstance(eng.model.layers[0].mlp.down_proj, QuantLinear)
                # Batched decode (rows > max_rows) takes the dense copy of the same blocks.
                many = eng.generate([prompts[0]] * 12, params)
                assert all(o["output_ids"] == outs["q4"][0] for o in many)
    for a, b in zip(outs["dense"], outs["q4"]):
        assert a[:4] == b[:4]
