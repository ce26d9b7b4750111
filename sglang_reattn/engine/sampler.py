"""Turn a step's logits into tokens: penalties, min_new_tokens, grammar masks,
temperature / top-k / top-p / min-p, seeded sampling, and logprobs."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglang_reattn.engine.request import Request


class SampleResult(NamedTuple):
    tokens: list[int]
    logprobs: list[float] | None  # logprob of each chosen token (requests that asked)
    top: list[list[tuple[float, int]]] | None


def needs_slow_path(reqs: list[Request]) -> bool:
    for r in reqs:
        p = r.params
        if (not p.is_greedy or p.has_penalties or r.grammar is not None
                or len(r.output_ids) < p.min_new_tokens or r.logprob.return_logprob):
            return True
    return False


def sample(logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
    """logits [B, V] float32, one row per request (in order)."""
    if not needs_slow_path(reqs):
        return SampleResult(logits.argmax(dim=-1).tolist(), None, None)
    tokens: list[int] = []
    lps: list[float] = []
    tops: list[list[tuple[float, int]]] = []
    for i, r in enumerate(reqs):
        raw = logits[i]
        row = _process(raw.clone(), r)
        tok = _choose(row, r)
        tokens.append(tok)
        if r.logprob.return_logprob:
            lp = torch.log_softmax(raw, dim=-1)
            lps.append(float(lp[tok]))
            tops.append(top_logprobs(lp, r.logprob.top_logprobs_num))
        else:
            lps.append(0.0)
            tops.append([])
    return SampleResult(tokens, lps, tops)


def top_logprobs(lp: torch.Tensor, k: int) -> list[tuple[float, int]]:
    if k <= 0:
        return []
    vals, ids = lp.topk(min(k, lp.shape[-1]))
    return list(zip(vals.tolist(), ids.tolist()))


def _process(row: torch.Tensor, r: Request) -> torch.Tensor:
    p = r.params
    if p.has_penalties and (r.output_ids or p.repetition_penalty != 1.0):
        out = torch.tensor(r.output_ids, dtype=torch.long, device=row.device)
        if out.numel():
            counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.all_ids)), dtype=torch.long, device=row.device)
            seen = seen[seen < row.shape[0]]
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                    vals * p.repetition_penalty)
    if len(r.output_ids) < p.min_new_tokens:
        banned = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(r.eos_ids))
        for t in banned:
            if t < row.shape[0]:
                row[t] = float("-inf")
    if r.grammar is not None:
        r.grammar.mask_logits(row)
    return row


def _choose(row: torch.Tensor, r: Request) -> int:
    p = r.params
    if p.top_k == 1:
        return int(row.argmax())
    probs = torch.softmax(row / p.temperature, dim=-1)
    if p.top_k < probs.shape[0]:
        kth = probs.topk(p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = (cum - sorted_p) > p.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    if p.min_p > 0.0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, torch.zeros_like(probs))
    if float(probs.sum()) <= 0.0:
        return int(row.argmax())
    return int(torch.multinomial(probs, 1, generator=r.generator))
