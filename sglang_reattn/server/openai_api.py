"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Requests become engine items (chat goes through the tokenizer's chat template first), run
through the same `Runner` as /generate, and the SGLang-shaped outputs are turned into
OpenAI's response, chunk, usage and logprobs shapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from sglang_reattn.server.http_errors import HTTPError, JSONResponse, status_of
from sglang_reattn.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from sglang_reattn.server.protocol import GenerateItem
from sglang_reattn.server.runner import new_rid
from sglang_reattn.server.sse import DONE, ClosingStreamingResponse, event


def add_routes(app: FastAPI, state: Any) -> None:
    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "sglang_reattn",
                "root": state.engine_args.model_path or state.model_name,
                "max_model_len": getattr(state.engine, "context_length", None)}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await state.parse(request, CompletionRequest)
        want_logprobs = req.logprobs is not None
        start = 0 if (req.echo and want_logprobs) else None
        params = req.sampling_params(req.max_tokens)
        items = [_item(state, p, params, want_logprobs, start, req.logprobs, req, i)
                 for i, p in enumerate(req.prompts())]
        echo = await _echo_texts(state, items) if req.echo else None
        shaper = _CompletionShaper(state.model_name, items[0].rid or new_rid(), echo, req.n)
        return await _respond(state, request, req, items, shaper, "completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatCompletionRequest = await state.parse(request, ChatCompletionRequest)
        ids = await asyncio.to_thread(_apply_template, state.engine.tokenizer, req)
        max_new = req.max_new_tokens
        if max_new is None:
            # As SGLang: without max_tokens a chat answer may use the rest of the context
            # (the engine's own default, 128, would cut answers short).
            max_new = max(1, int(state.engine.context_length) - len(ids))
        params = req.sampling_params(max_new)
        item = _item(state, ids, params, req.logprobs, None, req.top_logprobs, req, 0)
        shaper = _ChatShaper(state.model_name, item.rid or new_rid())
        return await _respond(state, request, req, [item], shaper, "chat")


def _item(state: Any, prompt: Any, params: dict[str, Any], logprobs: bool,
          start: int | None, top: int | None, req: Any, i: int) -> GenerateItem:
    return GenerateItem(
        text=prompt if isinstance(prompt, str) else None,
        input_ids=None if isinstance(prompt, str) else prompt,
        sampling_params=dict(params),
        return_logprob=logprobs,
        logprob_start_len=start,
        top_logprobs_num=top or None,
        return_text_in_logprobs=logprobs,
        rid=(f"{req.rid}-{i}" if i else req.rid) if req.rid else new_rid(),
        extra_key=req.namespace,
    )


def _apply_template(tokenizer: Any, req: ChatCompletionRequest) -> list[int]:
    messages = [m.to_template() for m in req.messages]
    kwargs = dict(req.chat_template_kwargs or {})
    if req.continue_final_message:
        kwargs.update(add_generation_prompt=False, continue_final_message=True)
    else:
        kwargs.setdefault("add_generation_prompt", True)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # a template may reject a role order, e.g. two system turns
        raise HTTPError(400, f"the chat template rejected the messages: {e}") from None
    # The template already has its special tokens (BOS); do not add them a second time.
    return list(tokenizer.encode(text, add_special_tokens=False))


async def _echo_texts(state: Any, items: list[GenerateItem]) -> list[str]:
    def decode(item: GenerateItem) -> str:
        if item.text is not None:
            return item.text
        return state.engine.tokenizer.decode(item.input_ids)
    return [await asyncio.to_thread(decode, item) for item in items]


async def _respond(state: Any, request: Request, req: Any, items: list[GenerateItem],
                   shaper: Any, route: str) -> Response:
    if req.stream:
        stream = await state.runner.open_stream(request, items, route, tag_index=True)
        body = _stream_body(stream, shaper, req.n, req.include_usage)
        return ClosingStreamingResponse(body, stream.close)
    outputs = await state.runner.generate(request, items, route)
    choices = [shaper.choice(k, out) for k, out in enumerate(outputs)]
    return JSONResponse(shaper.response(choices, _usage(outputs, req.n)))


async def _stream_body(stream: Any, shaper: Any, n: int, include_usage: bool
                       ) -> AsyncIterator[bytes]:
    finals: dict[int, dict[str, Any]] = {}
    try:
        async for out in stream:
            k = out["index"]
            for chunk in shaper.chunks(k, out):
                yield event(chunk)
            if out["meta_info"].get("finish_reason") is not None:
                finals[k] = out
        if include_usage:
            outputs = [finals[k] for k in sorted(finals)]
            yield event(shaper.usage_chunk(_usage(outputs, n)))
    except Exception as e:
        yield event({"error": {"message": str(e) or type(e).__name__,
                               "type": "BadRequestError", "code": status_of(e)}})
    yield DONE


def _usage(outputs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    metas = [o.get("meta_info", {}) for o in outputs]
    # The prompt is computed once per prompt, not once per sample.
    prompt = sum(int(m.get("prompt_tokens") or 0) for m in metas[::n])
    cached = sum(int(m.get("cached_tokens") or 0) for m in metas[::n])
    completion = sum(int(m.get("completion_tokens") or 0) for m in metas)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(meta: dict[str, Any]) -> tuple[str | None, Any]:
    reason = meta.get("finish_reason")
    if reason is None:
        return None, None
    kind = reason.get("type")
    if kind == "stop":
        return "stop", reason.get("matched")
    return kind, None  # "length" or "abort", as SGLang reports them


class _CompletionShaper:
    def __init__(self, model: str, rid: str, echo: list[str] | None, n: int) -> None:
        self.id = f"cmpl-{rid}"
        self.model = model
        self.created = int(time.time())
        self._echo = echo
        self._n = n
        self._sent: dict[int, tuple[int, int]] = {}  # index -> (chars, logprob entries)

    def _logprobs(self, meta: dict[str, Any], skip: int, echo: bool) -> dict[str, Any] | None:
        if "output_token_logprobs" not in meta:
            return None
        entries = list(meta.get("output_token_logprobs") or [])[skip:]
        tops = list(meta.get("output_top_logprobs") or [])[skip:]
        if echo:
            entries = list(meta.get("input_token_logprobs") or []) + entries
            tops = list(meta.get("input_top_logprobs") or []) + tops
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
        offset = 0
        for i, (lp, _tid, text) in enumerate(entries):
            out["tokens"].append(text or "")
            out["token_logprobs"].append(lp)
            top = tops[i] if i < len(tops) and tops[i] else []
            out["top_logprobs"].append({t or "": p for p, _x, t in top} if top else None)
            out["text_offset"].append(offset)
            offset += len(text or "")
        return out

    def choice(self, k: int, out: dict[str, Any]) -> dict[str, Any]:
        meta = out.get("meta_info", {})
        reason, matched = _finish(meta)
        text = out.get("text", "")
        if self._echo is not None:
            text = self._echo[k // self._n] + text
        return {"index": k, "text": text, "finish_reason": reason, "matched_stop": matched,
                "logprobs": self._logprobs(meta, 0, self._echo is not None)}

    def response(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": usage}

    def chunks(self, k: int, out: dict[str, Any]) -> list[dict[str, Any]]:
        meta = out.get("meta_info", {})
        chars, lps = self._sent.get(k, (0, 0))
        text = out.get("text", "")
        delta = text[chars:]
        first = k not in self._sent
        if first and self._echo is not None:
            delta = self._echo[k // self._n] + delta
        logprobs = self._logprobs(meta, lps, first and self._echo is not None)
        self._sent[k] = (len(text), len(meta.get("output_token_logprobs") or []))
        reason, matched = _finish(meta)
        if not delta and reason is None and not first:
            return []
        choice = {"index": k, "text": delta, "logprobs": logprobs, "finish_reason": reason,
                  "matched_stop": matched}
        return [{"id": self.id, "object": "text_completion", "created": self.created,
                 "model": self.model, "choices": [choice]}]

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": [], "usage": usage}


class _ChatShaper:
    def __init__(self, model: str, rid: str) -> None:
        self.id = f"chatcmpl-{rid}"
        self.model = model
        self.created = int(time.time())
        self._sent: dict[int, tuple[int, int]] = {}

    @staticmethod
    def _logprobs(meta: dict[str, Any], skip: int) -> dict[str, Any] | None:
        if "output_token_logprobs" not in meta:
            return None
        entries = list(meta.get("output_token_logprobs") or [])[skip:]
        tops = list(meta.get("output_top_logprobs") or [])[skip:]
        content = []
        for i, (lp, _tid, text) in enumerate(entries):
            text = text or ""
            top = tops[i] if i < len(tops) and tops[i] else []
            content.append({
                "token": text, "logprob": lp, "bytes": list(text.encode()),
                "top_logprobs": [{"token": t or "", "logprob": p,
                                  "bytes": list((t or "").encode())} for p, _x, t in top],
            })
        return {"content": content}

    def choice(self, k: int, out: dict[str, Any]) -> dict[str, Any]:
        meta = out.get("meta_info", {})
        reason, matched = _finish(meta)
        return {"index": k,
                "message": {"role": "assistant", "content": out.get("text", ""),
                            "tool_calls": None, "reasoning_content": None},
                "logprobs": self._logprobs(meta, 0), "finish_reason": reason,
                "matched_stop": matched}

    def response(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": usage}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [choice]}

    def chunks(self, k: int, out: dict[str, Any]) -> list[dict[str, Any]]:
        meta = out.get("meta_info", {})
        result = []
        if k not in self._sent:
            self._sent[k] = (0, 0)
            result.append(self._chunk({"index": k, "delta": {"role": "assistant",
                                                             "content": ""},
                                       "logprobs": None, "finish_reason": None}))
        chars, lps = self._sent[k]
        text = out.get("text", "")
        delta = text[chars:]
        logprobs = self._logprobs(meta, lps)
        self._sent[k] = (len(text), len(meta.get("output_token_logprobs") or []))
        reason, matched = _finish(meta)
        if delta or reason is not None:
            choice = {"index": k, "delta": {"content": delta} if delta else {},
                      "logprobs": logprobs, "finish_reason": reason}
            if reason is not None:
                choice["matched_stop"] = matched
            result.append(self._chunk(choice))
        return result

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage}
