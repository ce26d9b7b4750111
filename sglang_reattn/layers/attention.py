"""Paged attention over un-rotated keys.

Memory map: one KV pool per engine, `k[layer]` / `v[layer]` of shape
[num_pages, page_size, num_kv_heads, head_dim]. A page holds one chunk (C tokens) of one
sequence; keys are stored *before* RoPE. A sequence's scope is an ordered list of pages
(`page_table` row) and a token count (`scope_lens`): every page is full except possibly
the last. Token j of the scope is rotated at virtual position j, and queries sit at the
end of the scope. For full attention the scope is the whole sequence, so virtual
positions equal real ones.

Two implementations of the same contract: the torch path (CPU, and the reference) and the
Triton kernels of `sglang_reattn.kernels` (CUDA; decode is CUDA-graph capturable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sglang_reattn.models.rope import RopeTable, apply_rope


def pool_tensor(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                head_dim: int, dtype: torch.dtype, device: torch.device,
                heads_first: bool) -> torch.Tensor:
    """A zeroed [L, P, C, Hkv, D] pool tensor. `heads_first` stores it as [L, Hkv, P, C, D]
    and returns the permuted view: the same indexing, but one head's pages are then
    contiguous [C, D] blocks, which the torch decode path gathers straight into the
    heads-major layout its batched matmuls read, with no transposing copy."""
    if not heads_first:
        return torch.zeros(num_layers, num_pages, page_size, num_kv_heads, head_dim,
                           dtype=dtype, device=device)
    return torch.zeros(num_layers, num_kv_heads, num_pages, page_size, head_dim, dtype=dtype,
                       device=device).permute(0, 2, 3, 1, 4)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache [P, C, Hkv, D] (any strides) at flat slots page * C + offset <- x [T, Hkv, D]."""
    if cache.is_contiguous():
        cache.view(-1, *cache.shape[2:])[slots] = x
    else:
        c = cache.shape[1]
        cache[slots // c, slots % c] = x


class KVPool:
    """Pre-RoPE K and V pages for all layers, plus the free-page list.

    `k`/`v` are [L, P, C, Hkv, D] whatever the layout; `heads_first` (the CPU torch path)
    stores them heads-major underneath (see `pool_tensor`). The Triton kernels and CUDA
    graphs take the default layout."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 heads_first: bool = False) -> None:
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.heads_first = heads_first
        self.k = pool_tensor(*shape, dtype, device, heads_first)
        self.v = pool_tensor(*shape, dtype, device, heads_first)
        self.page_size = page_size
        self.num_pages = num_pages
        # Page 0 is never handed out: padded page-table entries point at it, so a stray
        # read in a padded CUDA-graph row stays inside the pool.
        self._free: list[int] = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), f"KV pool exhausted: need {n}, have {len(self._free)}"
        out = self._free[-n:] if n else []
        del self._free[len(self._free) - n:]
        return out[::-1]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


@dataclass
class ForwardBatch:
    """Per-step metadata shared by every layer.

    q tokens are packed sequence by sequence: `cu_q_lens` [B+1]. `scope_lens` [B] counts
    scope tokens *including* this step's new ones, which are the last `q_lens[b]` of them.
    """

    is_decode: bool
    slot_mapping: torch.Tensor  # [T] int64: page * page_size + offset of each new token
    page_table: torch.Tensor  # [B, max_pages] int32
    scope_lens: torch.Tensor  # [B] int32
    cu_q_lens: torch.Tensor  # [B+1] int32
    max_q_len: int
    # Host copies for the torch path (avoid device syncs); None inside CUDA graphs.
    pages_host: list[list[int]] | None = None
    scope_lens_host: list[int] | None = None
    q_lens_host: list[int] | None = None
    _page_idx: list[torch.Tensor] | None = None
    scope_plan: Any = None  # ReAttention's per-step ScopePlan, or None (full attention)
    in_graph: bool = False  # built for CUDA-graph capture: no host-side shortcuts
    streamed: bool = False  # some page table holds virtual pages (the streaming tier)
    completed_pages: torch.Tensor | None = None  # [n] pages whose last slot this step writes
    _positions: torch.Tensor | None = None
    _rot_checked: bool = False

    def new_positions(self, device: torch.device) -> torch.Tensor:
        """[T] real positions of the step's new tokens (torch path; host metadata)."""
        if self._positions is None:
            pos = [p for n, q in zip(self.scope_lens_host, self.q_lens_host)
                   for p in range(n - q, n)]
            self._positions = torch.tensor(pos, dtype=torch.long, device=device)
        return self._positions

    def page_index(self, device: torch.device) -> list[torch.Tensor]:
        """Per-sequence page-index tensors for the torch path, built once per step."""
        if self._page_idx is None:
            self._page_idx = [torch.tensor(p, dtype=torch.long, device=device)
                              for p in self.pages_host]
        return self._page_idx


class PagedAttention:
    """Full attention over the pool (the ReAttention backend narrows the scope per layer).

    The torch path also keeps `_rot`, every key rotated at its real position, for tokens
    below `rot_limit`. While a sequence's scope is the whole sequence (full attention, or
    ReAttention before it must select), virtual positions are real ones, so decode reads
    those keys instead of rotating the whole scope at every step. `_rot_base[page]` is the
    chunk index the page's rotated keys were computed for (-1: none); pages whose keys
    arrive by other means (the disk tier) are invalidated by `pages_loaded`, and a page
    found stale at decode time is re-rotated once, for all layers.
    """

    def __init__(self, pool: KVPool, rope: RopeTable, num_heads: int, head_dim: int,
                 sliding_window: int | None = None, use_triton: bool = False,
                 rot_limit: int = 0) -> None:
        self.pool = pool
        self.rope = rope
        self.num_heads = num_heads
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.use_triton = use_triton
        self._meta_cache: tuple | None = None
        c = pool.page_size
        self.rot_limit = 0 if use_triton else (rot_limit + c - 1) // c * c
        # Zeroed like the pool: masked padding must never read NaN bit patterns.
        self._rot = pool_tensor(*pool.k.shape, pool.k.dtype, pool.k.device,
                                pool.heads_first) if self.rot_limit else None
        self._rot_base = [-1] * pool.num_pages
        if self.rot_limit:
            rope.ensure(self.rot_limit)
        if use_triton:
            from sglang_reattn import kernels

            self._kernels = kernels

    def pages_loaded(self, pages: torch.Tensor) -> None:
        """Pages whose keys were written outside `store` (e.g. loaded from the disk tier)."""
        self.invalidate_rotated(pages)

    def invalidate_rotated(self, pages) -> None:
        """Forget the rotated keys of pages (a tensor or ints) rewritten outside `store`
        (all layers)."""
        for p in (pages.tolist() if torch.is_tensor(pages) else pages):
            self._rot_base[p] = -1

    def _store_rotated(self, layer_id: int, k: torch.Tensor, batch: ForwardBatch) -> None:
        pos = batch.new_positions(k.device)
        lim = self.rot_limit
        clamped = pos.clamp(max=lim - 1)  # keys past the limit are never read from _rot
        kr = apply_rope(k, self.rope.cos[clamped], self.rope.sin[clamped])
        write_slots(self._rot[layer_id], batch.slot_mapping, kr)
        if layer_id == 0:
            c = self.pool.page_size
            for pages, n, q in zip(batch.pages_host, batch.scope_lens_host, batch.q_lens_host):
                for i in range((n - q) // c, (n - 1) // c + 1):
                    self._rot_base[pages[i]] = i if (i + 1) * c <= lim else -1

    def _fresh_rotations(self, pages_host: list[list[int]], device: torch.device) -> None:
        """Re-rotate (all layers) the pages of this step's scopes whose `_rot` is stale."""
        c = self.pool.page_size
        stale = [(p, i) for pages in pages_host for i, p in enumerate(pages)
                 if self._rot_base[p] != i]
        if not stale:
            return
        idx = torch.tensor([p for p, _ in stale], dtype=torch.long, device=device)
        pos = (torch.tensor([i for _, i in stale], device=device)[:, None] * c
               + torch.arange(c, device=device)).flatten()
        k = self.pool.k[:, idx]  # [L, n, C, Hkv, D]
        shape = k.shape
        kr = apply_rope(k.flatten(1, 2), self.rope.cos[pos], self.rope.sin[pos])
        self._rot[:, idx] = kr.view(shape)
        for p, i in stale:
            self._rot_base[p] = i

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        self.store(layer_id, k, v, batch)
        return self.attend_scope(layer_id, q, batch, batch.page_table, batch.scope_lens,
                                 batch.pages_host, batch.scope_lens_host)

    def store(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        k_cache, v_cache = self.pool.k[layer_id], self.pool.v[layer_id]
        if self.use_triton:
            self._kernels.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
            return
        write_slots(k_cache, batch.slot_mapping, k)
        write_slots(v_cache, batch.slot_mapping, v)
        if self._rot is not None:
            if batch.scope_lens_host is not None and batch.pages_host is not None:
                self._store_rotated(layer_id, k, batch)
            elif layer_id == 0:  # no host metadata (graph buffers): rotate these pages later
                self.pages_loaded((batch.slot_mapping // self.pool.page_size).unique())

    def attend_scope(self, layer_id: int, q: torch.Tensor, batch: ForwardBatch,
                     table: torch.Tensor, lens: torch.Tensor,
                     pages_host: list[list[int]] | None,
                     lens_host: list[int] | None) -> torch.Tensor:
        """Attention of the step's queries over the scopes given by (`table`, `lens`)."""
        k_cache, v_cache = self.pool.k[layer_id], self.pool.v[layer_id]
        if self.use_triton:
            kn = self._kernels
            if batch.is_decode:
                return kn.decode_attention(q, k_cache, v_cache, table, lens, self.rope.cos,
                                           self.rope.sin, self.scale)
            return kn.prefill_attention(q, k_cache, v_cache, table, lens, batch.cu_q_lens,
                                        batch.max_q_len, self.rope.cos, self.rope.sin,
                                        self.scale, lens_host, batch.q_lens_host)
        if pages_host is None:
            c = self.pool.page_size
            lens_host = lens.tolist()
            pages_host = [row[: (n + c - 1) // c] for row, n in zip(table.tolist(), lens_host)]
            idx = [torch.tensor(p, dtype=torch.long, device=q.device) for p in pages_host]
        else:
            idx = batch.page_index(q.device)
        assert batch.q_lens_host is not None
        if batch.is_decode:
            rot = None
            if pages_host is batch.pages_host and self._rot is not None \
                    and max(lens_host) <= self.rot_limit:
                if not batch._rot_checked:
                    self._fresh_rotations(pages_host, q.device)
                    batch._rot_checked = True
                rot = self._rot[layer_id]
            return self._torch_decode(q, k_cache, v_cache, idx, lens_host, rot)
        out = torch.empty_like(q)
        start = 0
        for pages, n_kv, n_q in zip(idx, lens_host, batch.q_lens_host):
            keys = k_cache[pages].flatten(0, 1)[:n_kv]  # [n_kv, Hkv, D], un-rotated
            vals = v_cache[pages].flatten(0, 1)[:n_kv]
            out[start:start + n_q] = self.attend(q[start:start + n_q], keys, vals)
            start += n_q
        return out

    def _decode_meta(self, page_idx: list[torch.Tensor], lens: list[int],
                     device: torch.device) -> tuple:
        """Per-step decode metadata shared by every layer: each scope's pages padded to
        one width with page 0 ([B * W] flat, for one `index_select` of whole pages, which
        copies far faster than a per-token gather), the padding/window mask [B, W * C],
        and the queries' RoPE rows. Every layer of a step shares one scope layout unless
        ReAttention narrows it, so it is cached by identity."""
        key = (id(page_idx), tuple(lens))
        if self._meta_cache is not None and self._meta_cache[0] == key:
            return self._meta_cache[1]
        width = max(len(p) for p in page_idx)
        n = width * self.pool.page_size
        self.rope.ensure(n)
        table = torch.zeros(len(lens), width, dtype=torch.long, device=device)
        for i, pages in enumerate(page_idx):
            table[i, : len(pages)] = pages
        pos = torch.tensor(lens, device=device) - 1
        k_pos = torch.arange(n, device=device)[None, :]
        mask = k_pos <= pos[:, None]
        if self.sliding_window is not None:
            mask = mask & (pos[:, None] - k_pos < self.sliding_window)
        flat = table.flatten()
        # the same pages as rows of a heads-first layer viewed [Hkv * P, C, D]
        hkv, num_pages = self.pool.k.shape[3], self.pool.num_pages
        flat_heads = (torch.arange(hkv, device=device)[:, None] * num_pages + flat).flatten()
        meta = (flat, flat_heads, n, mask, self.rope.cos[pos], self.rope.sin[pos])
        self._meta_cache = (key, meta, page_idx)  # keep page_idx alive: ids stay unique
        return meta

    def _torch_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      page_idx: list[torch.Tensor], lens: list[int],
                      rotated: torch.Tensor | None = None) -> torch.Tensor:
        """All sequences at once (one query each). Each KV head's scope pages are gathered
        into a padded [Hkv * B, L, D] block (one `index_select` per tensor; with a
        heads-first pool, a gather of contiguous [C, D] rows), keys rotated at positions 0..L-1 (or
        read already rotated from `rotated`), then two batched matmuls over (head,
        sequence) with the query heads of a GQA group as rows, a float32 softmax and the
        padding masked. A handful of ops per layer whatever the batch."""
        flat, flat_heads, n, mask, q_cos, q_sin = self._decode_meta(page_idx, lens, q.device)
        b, hq, d = q.shape
        hkv = k_cache.shape[2]

        def heads_of(cache: torch.Tensor) -> torch.Tensor:  # [P, C, Hkv, D] -> [Hkv*B, n, D]
            heads = cache.permute(2, 0, 1, 3)  # [Hkv, P, C, D]
            if heads.is_contiguous():  # heads-first pool: one row gather
                return heads.reshape(-1, *heads.shape[2:]).index_select(0, flat_heads).view(
                    hkv * b, n, d)
            return heads.index_select(1, flat).view(hkv * b, n, d)

        if rotated is not None:
            kr = heads_of(rotated)
        else:
            kr = apply_rope(heads_of(k_cache)[:, :, None, :], self.rope.cos[:n],
                            self.rope.sin[:n])[:, :, 0, :]
        vals = heads_of(v_cache)
        qr = apply_rope(q, q_cos, q_sin)  # [B, Hq, D]
        qh = qr.view(b, hkv, hq // hkv, d).transpose(0, 1).reshape(hkv * b, hq // hkv, d)
        s = torch.bmm(qh, kr.transpose(1, 2)).float().view(hkv, b, -1, n)
        s = (s * self.scale).masked_fill_(~mask[None, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).to(vals.dtype).view(hkv * b, -1, n)
        o = torch.bmm(p, vals).view(hkv, b, -1, d)  # [Hkv, B, G, D]
        return o.transpose(0, 1).reshape(b, hq, d)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """q [n_q, Hq, D] (the last n_q scope tokens), keys/vals [n_kv, Hkv, D] un-rotated,
        in scope order -> [n_q, Hq, D]. The reference every kernel is checked against."""
        n_q, n_kv = q.shape[0], keys.shape[0]
        self.rope.ensure(n_kv)
        qr = apply_rope(q, self.rope.cos[n_kv - n_q:n_kv], self.rope.sin[n_kv - n_q:n_kv])
        kr = apply_rope(keys, self.rope.cos[:n_kv], self.rope.sin[:n_kv])
        kr = kr.transpose(0, 1)  # [Hkv, n_kv, D]
        vr = vals.transpose(0, 1)
        qr = qr.transpose(0, 1)  # [Hq, n_q, D]
        mask = None
        if n_q > 1 or self.sliding_window is not None:
            q_pos = torch.arange(n_kv - n_q, n_kv, device=q.device)[:, None]
            k_pos = torch.arange(n_kv, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if self.sliding_window is not None:
                mask = mask & (q_pos - k_pos < self.sliding_window)
        # GQA: query head h reads kv head h // (Hq / Hkv), as transformers' repeat_kv does.
        # 4-D inputs: torch's CPU SDPA takes its fused (flash) kernel only for those; 3-D
        # ones fall back to the math path, which materializes every score several times.
        o = F.scaled_dot_product_attention(qr[None], kr[None], vr[None], attn_mask=mask,
                                           scale=self.scale,
                                           enable_gqa=kr.shape[0] != qr.shape[0])
        return o[0].transpose(0, 1)
