"""Prefill attention over a ReAttention scope: the paged Triton kernel (RoPE on the fly)
against gathering and rotating the scope once, then a flash-attention kernel (torch SDPA
backends) over contiguous keys (H200 A/B, one run).

The engine's route for long query blocks is `prefill_attention_gathered` (one Triton
launch gathers and rotates, then SDPA's flash backend). One chunked-prefill step of one
layer: `--new` query tokens at the end of the engine's scope (sink 64 + top-k 95 chunks of
64 + local 2048 before the new tokens + the new ones). Every variant is checked against
the first on the same inputs, and timed (median of back-to-back launches). TFLOP/s count
the causal FLOPs.

    python benchmarks/bench_prefill_attention.py --new 2048 4096
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sglang_reattn.kernels as K  # noqa: E402
from bench_attention import bench, knobs  # noqa: E402

SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # query heads, KV heads, head dim
BEFORE = 64 + 95 * 64 + 2048  # scope tokens before the new ones


def gather_rotate(q, kc, vc, pages, n, cos, sin):
    """-> q, k rotated at their scope positions and v, as [1, H, L, D] (torch ops)."""
    k = kc[pages].flatten(0, 1)[:n]  # [n, Hkv, D]
    v = vc[pages].flatten(0, 1)[:n]
    pos = torch.arange(n, device=q.device)
    kr = K.apply_rope_ref(k, pos, cos, sin).to(q.dtype)
    qr = K.apply_rope_ref(q, pos[n - q.shape[0]:], cos, sin).to(q.dtype)
    return qr.transpose(0, 1)[None], kr.transpose(0, 1)[None], v.transpose(0, 1)[None]


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    def run(q, kc, vc, pages, n, cos, sin, scale):
        qr, kr, v = gather_rotate(q, kc, vc, pages, n, cos, sin)
        mask = causal_lower_right(qr.shape[2], n)
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        return o[0].transpose(0, 1)
    return run


def sdpa_expanded(backend):
    """GQA expanded to all query heads first (for backends without enable_gqa)."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    def run(q, kc, vc, pages, n, cos, sin, scale):
        qr, kr, v = gather_rotate(q, kc, vc, pages, n, cos, sin)
        g = qr.shape[1] // kr.shape[1]
        kr, v = kr.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        mask = causal_lower_right(qr.shape[2], n)
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, scale=scale)
        return o[0].transpose(0, 1)
    return run


def split_merge(backend: str, expand: bool = False):
    """The scope before the new tokens (no mask) and the new tokens' own block (causal,
    square: both alignments agree) as two attention calls, merged by their log-sum-exps:
    for kernels whose bottom-right causal mask is slow or missing."""
    def attend(q, k, v, causal, scale):
        if expand:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        if backend == "cudnn":
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale)
        else:
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale)
        return out[0], out[1].reshape(q.shape[:3]).float()

    def run(q, kc, vc, pages, n, cos, sin, scale):
        qr, kr, v = K.gather_rope_scope(q, kc, vc, pages.int(), n, cos, sin)
        pre = n - q.shape[0]
        o1, l1 = attend(qr[None], kr[None, :, :pre], v[None, :, :pre], False, scale)
        o2, l2 = attend(qr[None], kr[None, :, pre:], v[None, :, pre:], True, scale)
        m = torch.maximum(l1, l2)
        w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
        o = (o1.float() * w1 + o2.float() * w2) / (w1 + w2)
        return o[0].transpose(0, 1).to(q.dtype)
    return run


def engine_route(merge_triton: bool):
    """The engine's route (``prefill_attention_gathered``) with the log-sum-exp merge of
    the cuDNN split as torch ops or as one Triton launch."""
    def run(q, kc, vc, pages, n, cos, sin, scale):
        with knobs("prefill_attention", PREFILL_MERGE_TRITON=merge_triton):
            return K.prefill_attention_gathered(q, kc, vc, pages.int()[None], [n],
                                                [q.shape[0]], cos, sin, scale)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--rep", type=int, default=50)
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend

    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"# bench_prefill_attention on {torch.cuda.get_device_name(dev)}, bf16; ms and "
          f"causal TFLOP/s of one layer's prefill step\n")
    variants = [("triton paged, RoPE in kernel", None),
                ("gathered (engine)", "ours"),
                ("Triton gather only", "triton_gather"),
                ("torch gather+rotate only", "gather"),
                ("SDPA flash, GQA", sdpa(SDPBackend.FLASH_ATTENTION)),
                ("SDPA cuDNN, GQA", sdpa(SDPBackend.CUDNN_ATTENTION)),
                ("SDPA cuDNN, expanded", sdpa_expanded(SDPBackend.CUDNN_ATTENTION)),
                ("SDPA efficient, expanded", sdpa_expanded(SDPBackend.EFFICIENT_ATTENTION)),
                ("flash, split + merge", split_merge("flash")),
                ("cuDNN, split + merge", split_merge("cudnn")),
                ("cuDNN expanded, split + merge", split_merge("cudnn", True)),
                ("engine, torch merge", engine_route(False)),
                ("engine, Triton merge", engine_route(True))]
    rows = []
    for name, (hq, hkv, d) in SHAPES.items():
        for new in args.new:
            n = BEFORE + new
            c = 64
            npages = (n + c - 1) // c
            total = npages + 64
            kc = torch.randn(total, c, hkv, d, device=dev, dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            pages = torch.randperm(total, device=dev)[:npages]
            pt = pages.int()[None]
            sl = torch.tensor([n], device=dev, dtype=torch.int32)
            cu = torch.tensor([0, new], device=dev, dtype=torch.int32)
            q = torch.randn(new, hq, d, device=dev, dtype=torch.bfloat16)
            cos, sin = K.rope_tables(n, d, base=500000.0, device=dev)
            scale = d ** -0.5
            flops = 4 * hq * d * (new * (n - new) + new * (new + 1) / 2)
            ref = K.prefill_attention_triton(q, kc, vc, pt, sl, cu, new, cos, sin, scale)
            row = {"shape": name, "new": new}
            for label, fn in variants:
                try:
                    if fn is None:
                        call = lambda: K.prefill_attention_triton(  # noqa: E731
                            q, kc, vc, pt, sl, cu, new, cos, sin, scale)
                        err = 0.0
                    elif fn == "ours":
                        call = lambda: K.prefill_attention_gathered(  # noqa: E731
                            q, kc, vc, pt, [n], [new], cos, sin, scale)
                        err = float((call().float() - ref.float()).abs().max())
                    elif fn == "triton_gather":
                        call = lambda: K.gather_rope_scope(q, kc, vc, pt[0], n, cos, sin)  # noqa
                        err = 0.0
                    elif fn == "gather":
                        call = lambda: gather_rotate(q, kc, vc, pages, n, cos, sin)  # noqa: E731
                        err = 0.0
                    else:
                        call = lambda fn=fn: fn(q, kc, vc, pages, n, cos, sin, scale)  # noqa
                        err = float((call().float() - ref.float()).abs().max())
                    ms = bench(call, args.rep)
                    row[label] = (ms, flops / ms / 1e9, err)
                except Exception as e:  # a backend that cannot run this: say why
                    row[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
                print(f"# {name} new {new}: {label}: {row[label]}", flush=True)
            rows.append(row)
    print("\n| shape | new tokens | " + " | ".join(v[0] for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for row in rows:
        cells = []
        for label, _ in variants:
            v = row[label]
            cells.append(v if isinstance(v, str) else
                         f"{v[0]:.3f} ms, {v[1]:.0f} TF/s" + (f", err {v[2]:.1e}" if v[2] else ""))
        print(f"| {row['shape']} | {row['new']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
