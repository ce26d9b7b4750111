"""Triton kernels of sglang_reattn, each with a plain-torch reference beside it.

Ops (shapes in each function's docstring):
  - ``decode_attention``: one query per sequence over its paged scope, RoPE on the fly.
  - ``prefill_attention``: packed varlen queries, causal over the end of their scope.
  - ``store_kv``: write K/V into the paged cache and update the per-page key summaries.
  - ``score_chunks``: score candidate pages by their summaries, one top-k per sequence.
  - ``select_scope``: scoring, top-k and the scope page table of one step, fused.
  - ``rms_norm_triton``: RMSNorm with the residual add fused in (the model uses it on GPUs).
  - ``silu_mul_triton``: SwiGLU's ``silu(gate) * up`` in one pass (idem).

The dispatchers below run Triton when the tensors are on CUDA (or ``TRITON_INTERPRET=1``
is set) and the torch reference otherwise, so CPU inference works without Triton.
This package imports nothing of ``sglang_reattn``.
"""

from __future__ import annotations

import torch

from ._triton_compat import HAS_TRITON, use_triton
from .activation import silu_mul_ref, silu_mul_triton
from .decode_attention import (
    decode_attention_ref,
    decode_attention_triton,
    default_num_splits,
    gather_scope_ref,
)
from .prefill_attention import (
    GATHER_MIN_Q,
    gather_rope_scope,
    merge_lse_triton,
    prefill_attention_gathered,
    prefill_attention_ref,
    prefill_attention_triton,
)
from .rms_norm import rms_norm_ref, rms_norm_triton
from .rope import apply_rope_ref, rope_tables
from .score_chunks import (
    COMBINE_MODES,
    chunk_scores_ref,
    chunk_scores_triton,
    combine_head_scores,
    score_chunks_ref,
    score_chunks_triton,
    select_topk,
)
from .select_scope import (
    assemble_scope_host,
    assemble_scope_ref,
    scope_scores_ref,
    map_pages,
    select_scope_ref,
    select_scope_triton,
)
from .store_kv import chunk_summaries_ref, store_kv_ref, store_kv_triton

__all__ = [
    "HAS_TRITON", "COMBINE_MODES", "use_triton",
    "decode_attention", "decode_attention_ref", "decode_attention_triton", "default_num_splits",
    "prefill_attention", "prefill_attention_ref", "prefill_attention_triton",
    "prefill_attention_gathered", "gather_rope_scope", "merge_lse_triton", "GATHER_MIN_Q",
    "store_kv", "store_kv_ref", "store_kv_triton", "chunk_summaries_ref",
    "score_chunks", "score_chunks_ref", "score_chunks_triton",
    "chunk_scores", "chunk_scores_ref", "chunk_scores_triton",
    "combine_head_scores", "select_topk",
    "select_scope", "select_scope_ref", "select_scope_triton", "assemble_scope_ref",
    "assemble_scope_host", "map_pages",
    "scope_scores_ref",
    "apply_rope_ref", "rope_tables", "gather_scope_ref", "rms_norm_ref", "rms_norm_triton",
    "silu_mul_ref", "silu_mul_triton",
]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, scope_lens: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, sm_scale: float,
                     num_splits: int | None = None) -> torch.Tensor:
    """``[B, Hq, D]`` decode attention; see ``decode_attention_ref``."""
    fn = decode_attention_triton if use_triton(q) else decode_attention_ref
    return fn(q, k_cache, v_cache, page_table, scope_lens, cos, sin, sm_scale, num_splits)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      page_table: torch.Tensor, scope_lens: torch.Tensor,
                      cu_q_lens: torch.Tensor, max_q_len: int, cos: torch.Tensor,
                      sin: torch.Tensor, sm_scale: float, lens_host: list[int] | None = None,
                      q_lens_host: list[int] | None = None) -> torch.Tensor:
    """``[T, Hq, D]`` packed prefill attention; see ``prefill_attention_ref``. On a GPU,
    with the scope and query lengths on the host (``lens_host``, ``q_lens_host``), query
    blocks of at least ``GATHER_MIN_Q`` take ``prefill_attention_gathered``."""
    if (q.is_cuda and lens_host is not None and q_lens_host is not None
            and max(q_lens_host) >= GATHER_MIN_Q):
        return prefill_attention_gathered(q, k_cache, v_cache, page_table, lens_host,
                                          q_lens_host, cos, sin, sm_scale)
    fn = prefill_attention_triton if use_triton(q) else prefill_attention_ref
    return fn(q, k_cache, v_cache, page_table, scope_lens, cu_q_lens, max_q_len, cos, sin,
              sm_scale)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kmin: torch.Tensor | None = None,
             kmax: torch.Tensor | None = None, kmean: torch.Tensor | None = None) -> None:
    """In-place K/V store plus summary update; see ``store_kv_ref``."""
    fn = store_kv_triton if use_triton(k_cache) else store_kv_ref
    fn(k, v, k_cache, v_cache, slot_mapping, kmin, kmax, kmean)


def score_chunks(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                 topk: int, kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                 kmean: torch.Tensor | None = None,
                 combine: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected [B, topk] int32, num_selected [B] int32)``; see ``score_chunks_ref``."""
    fn = score_chunks_triton if use_triton(q) else score_chunks_ref
    return fn(q, cand_pages, num_cands, topk, kmin, kmax, kmean, combine)


def chunk_scores(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                 kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                 kmean: torch.Tensor | None = None, per_head: bool = False) -> torch.Tensor:
    """Raw float32 scores ``[B, N]`` or ``[B, Hq, N]``; see ``chunk_scores_triton``."""
    fn = chunk_scores_triton if use_triton(q) else chunk_scores_ref
    return fn(q, cand_pages, num_cands, kmin, kmax, kmean, per_head)


def select_scope(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                 head_table: torch.Tensor, head_pages: torch.Tensor, local_table: torch.Tensor,
                 local_tokens: torch.Tensor, topk: int, chunk_size: int,
                 kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                 kmean: torch.Tensor | None = None, combine: str = "max", reps: int = 1,
                 page_map: torch.Tensor | None = None, map_base: int = 0, spare: int = 0):
    """``(table, lens, sel_pages, num_sel)`` of one layer's scope, and with ``spare`` the
    runners-up; see ``select_scope_ref``."""
    fn = select_scope_triton if use_triton(q) else select_scope_ref
    return fn(q, cand_pages, num_cands, head_table, head_pages, local_table, local_tokens,
              topk, chunk_size, kmin, kmax, kmean, combine, reps, page_map, map_base, spare)
