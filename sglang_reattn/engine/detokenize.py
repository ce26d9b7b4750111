"""Output text, stop strings and SGLang-shaped result dicts."""

from __future__ import annotations

import time
from typing import Any

from sglang_reattn.engine.request import Request


def _decode(tokenizer, ids: list[int], r: Request) -> str:
    return tokenizer.decode(
        ids,
        skip_special_tokens=r.params.skip_special_tokens,
        spaces_between_special_tokens=r.params.spaces_between_special_tokens,
    )


def update_text(r: Request, tokenizer, final: bool = False) -> str | None:
    """Refresh `r.text` from the output ids; return the stop string that matched, if any.

    Incremental: only the tail since the last complete character boundary is decoded each
    step (the last few tokens are re-decoded as context, so byte-level merges and
    multi-byte characters come out exactly as a one-shot decode would). The final call
    decodes everything once, so the returned text never depends on the increments.
    """
    ids = r.output_ids
    reason = r.finish_reason
    if final:
        if (reason and reason.get("type") == "stop" and isinstance(reason.get("matched"), int)
                and ids and ids[-1] == reason["matched"] and not r.params.no_stop_trim):
            ids = ids[:-1]
        text = _decode(tokenizer, ids, r)
    else:
        state = r.detok
        if state is None:
            state = r.detok = [0, 0, ""]  # [prefix_offset, read_offset, text so far]
        prefix, read, done = state
        prev = _decode(tokenizer, ids[prefix:read], r)
        cur = _decode(tokenizer, ids[prefix:], r)
        if cur.endswith("\ufffd"):
            return None  # half of a multi-byte character: wait for the next token
        done += cur[len(prev):]
        # Keep a few decoded tokens as context for the next increment.
        state[0], state[1], state[2] = max(len(ids) - 4, 0), len(ids), done
        text = done
    matched = _find_stop(text, r.params.stop_strs, len(r.text) if not final else 0)
    if matched is not None:
        i, s = matched
        text = text[: i + len(s)] if r.params.no_stop_trim else text[:i]
    r.text = text
    return None if matched is None else matched[1]


def _find_stop(text: str, stops: list[str], old_len: int) -> tuple[int, str] | None:
    best = None
    for s in stops:
        # A new match must end inside the new text; earlier text was already checked.
        i = text.find(s, max(0, old_len - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _triples(tokenizer, pairs, with_text: bool) -> list[list[Any]]:
    return [[lp, tok, tokenizer.decode([tok]) if with_text else None] for lp, tok in pairs]


def output_dict(r: Request, tokenizer) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": r.rid,
        "finish_reason": r.finish_reason,
        "prompt_tokens": len(r.prompt_ids),
        "completion_tokens": len(r.output_ids),
        "cached_tokens": r.cached_tokens,
        "e2e_latency": time.perf_counter() - r.created,
    }
    if r.finish_reason and "message" in r.finish_reason:
        meta["error"] = r.finish_reason["message"]
    lp = r.logprob
    if lp.return_logprob:
        txt = lp.return_text_in_logprobs
        meta["input_token_logprobs"] = _triples(tokenizer, r.input_logprobs, txt)
        meta["output_token_logprobs"] = _triples(tokenizer, r.output_logprobs, txt)
        if lp.top_logprobs_num:
            meta["input_top_logprobs"] = [
                None if t is None else _triples(tokenizer, t, txt) for t in r.input_top
            ]
            meta["output_top_logprobs"] = [
                None if t is None else _triples(tokenizer, t, txt) for t in r.output_top
            ]
    return {"text": r.text, "output_ids": list(r.output_ids), "meta_info": meta}
