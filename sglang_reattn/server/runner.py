"""Runs generation requests on the engine for the HTTP routes, native and OpenAI alike.

It owns the request ids: every engine call gets an explicit rid, every rid is tracked
until its output is final, and a rid whose consumer goes away (client disconnect,
server shutdown, an error in a sibling of its batch) is aborted on the engine, which
does not abort on cancellation by itself.

Streams are per output: a batch, or n > 1 samples, becomes several engine streams merged
into one, each chunk tagged with its `index` (prompt-major: prompt i, sample j ->
i * n + j).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from sglang_reattn.server.http_errors import HTTPError
from sglang_reattn.server.metrics import ServerMetrics
from sglang_reattn.server.protocol import GenerateItem

logger = logging.getLogger(__name__)

ABORT = {"type": "abort"}
_TOKENIZE_OFF_LOOP_CHARS = 4096


def new_rid() -> str:
    return uuid.uuid4().hex


@dataclass
class _SubStream:
    index: int
    rid: str
    kwargs: dict[str, Any]
    count_prompt: bool
    iterator: Any = None
    first: dict[str, Any] | None = None
    last: dict[str, Any] = field(default_factory=dict)
    done: bool = False


class Runner:
    def __init__(self, engine: Any, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._inflight: set[str] = set()
        self.draining = False

    # --- bookkeeping -------------------------------------------------------------------
    def check_accepting(self) -> None:
        if self.draining:
            raise HTTPError(503, "the server is shutting down")

    def abort(self, rid: str) -> None:
        if rid not in self._inflight:
            return
        try:
            self.engine.abort(rid)
        except Exception:  # aborting is best effort: the request may have just finished
            logger.exception("engine.abort(%s) failed", rid)

    def abort_all(self) -> None:
        for rid in list(self._inflight):
            self.abort(rid)

    def begin_drain(self, timeout: float) -> None:
        """Stop taking requests; abort whatever is still running after `timeout` s."""
        if self.draining:
            return
        self.draining = True
        logger.info("shutting down: %d request(s) in flight get %.1f s to finish",
                    len(self._inflight), timeout)
        asyncio.get_running_loop().call_later(timeout, self.abort_all)

    async def _start(self, kwargs: dict[str, Any]) -> Any:
        prompt = kwargs.get("prompt")
        if isinstance(prompt, str) and len(prompt) > _TOKENIZE_OFF_LOOP_CHARS:
            # async_generate tokenizes on the calling thread, i.e. the event loop: a long
            # document would stall every other stream. Same tokenizer, same call, in a worker.
            ids = await asyncio.to_thread(self.engine.tokenizer.encode, prompt)
            kwargs = {**kwargs, "prompt": None, "input_ids": list(ids)}
        res = self.engine.async_generate(**kwargs)
        if inspect.isawaitable(res):
            res = await res
        return res

    # --- non-streaming -----------------------------------------------------------------
    async def generate(self, request: Request, items: list[GenerateItem],
                       route: str) -> list[dict[str, Any]]:
        """All outputs of `items`, flattened prompt-major. Aborts them if the client leaves."""
        self.check_accepting()
        started = time.perf_counter()
        subs = _expand(items, stream=False)
        rids = [s.rid for s in subs]
        self._inflight.update(rids)
        self.metrics.request_opened()
        try:
            # A bad item fails the whole request; its siblings are aborted below.
            coros = [self._start(s.kwargs) for s in subs]
            results = await until_disconnect(
                request, asyncio.gather(*coros, return_exceptions=True),
                lambda: [self.abort(r) for r in rids])
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                for rid in rids:
                    self.abort(rid)
                raise errors[0]
        finally:
            self._inflight.difference_update(rids)
            self.metrics.request_closed()
        for sub, out in zip(subs, results, strict=True):
            self.metrics.finished(route, out.get("meta_info", {}), started, sub.count_prompt)
        return list(results)

    # --- streaming ---------------------------------------------------------------------
    async def open_stream(self, request: Request, items: list[GenerateItem], route: str,
                          tag_index: bool) -> OutputStream:
        """Start every output's stream and wait for its first chunk, so that bad input is
        reported as an HTTP error before the 200 and the SSE headers go out."""
        self.check_accepting()
        subs = _expand(items, stream=True)
        stream = OutputStream(self, subs, route, tag_index)
        self._inflight.update(s.rid for s in subs)
        self.metrics.request_opened()
        try:
            await until_disconnect(request, stream.prime(), stream.abort_unfinished)
        except BaseException:
            await stream.close()
            raise
        return stream


def _expand(items: list[GenerateItem], stream: bool) -> list[_SubStream]:
    """One engine call per output. n > 1 is expanded here rather than in the engine so
    that every output has a rid this server knows (to abort it) and its own stream;
    sample j gets rid `<rid>/j` and seed + j, as the engine would give it."""
    subs = []
    for i, item in enumerate(items):
        n = item.n
        base = item.rid or new_rid()
        for j in range(n):
            kwargs = item.engine_kwargs(base if n == 1 else f"{base}/{j}", stream=stream)
            params = kwargs["sampling_params"]
            params.pop("n", None)
            if n > 1 and params.get("seed") is not None:
                params["seed"] += j  # n samples, not n copies of one
            subs.append(_SubStream(index=i * n + j, rid=kwargs["rid"], kwargs=kwargs,
                                   count_prompt=j == 0))
    return subs


class OutputStream:
    """Merged chunks of several engine streams; `close()` aborts the unfinished ones."""

    def __init__(self, runner: Runner, subs: list[_SubStream], route: str,
                 tag_index: bool) -> None:
        self._runner = runner
        self._subs = subs
        self._route = route
        self._tag = tag_index
        self._started = time.perf_counter()
        self._timers = [runner.metrics.stream_timer(self._started) for _ in subs]
        self._closed = False
        self._tasks: list[asyncio.Task] = []

    async def prime(self) -> None:
        for sub in self._subs:  # start all first: a bad item fails before any is queued
            sub.iterator = await self._runner._start(sub.kwargs)
        await asyncio.gather(*(self._first(sub) for sub in self._subs))

    async def _first(self, sub: _SubStream) -> None:
        sub.first = await self._next(sub)

    async def _next(self, sub: _SubStream) -> dict[str, Any] | None:
        try:
            if hasattr(sub.iterator, "__anext__"):
                return await sub.iterator.__anext__()
            return await asyncio.to_thread(next, sub.iterator, None)
        except StopAsyncIteration:
            return None

    def _emit(self, sub: _SubStream, out: dict[str, Any] | None) -> dict[str, Any] | None:
        """Bookkeeping of one engine chunk; None when the stream ended without a final
        chunk (an abort the engine did not report): a final abort chunk is made up."""
        if out is None:
            if sub.done:
                return None
            out = dict(sub.last) or {"text": "", "output_ids": [], "meta_info": {}}
            out["meta_info"] = {**out.get("meta_info", {}), "finish_reason": ABORT}
        out = dict(out)
        meta = out.get("meta_info", {})
        self._timers[self._subs.index(sub)].chunk(int(meta.get("completion_tokens") or 0))
        sub.last = out
        if meta.get("finish_reason") is not None:
            sub.done = True
            self._runner._inflight.discard(sub.rid)
            self._runner.metrics.finished(self._route, meta, self._started, sub.count_prompt)
        if self._tag:
            out["index"] = sub.index
        return out

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if len(self._subs) == 1:
            sub = self._subs[0]
            out = sub.first
            while True:
                chunk = self._emit(sub, out)
                if chunk is None:
                    return
                yield chunk
                if sub.done:
                    return
                out = await self._next(sub)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(sub: _SubStream) -> None:
            out = sub.first
            try:
                while True:
                    chunk = self._emit(sub, out)
                    if chunk is None:
                        break
                    await queue.put(chunk)
                    if sub.done:
                        break
                    out = await self._next(sub)
            except Exception as e:
                await queue.put(e)
            await queue.put(None)

        self._tasks = [asyncio.create_task(pump(s)) for s in self._subs]
        remaining = len(self._subs)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item

    def abort_unfinished(self) -> None:
        for sub in self._subs:
            if not sub.done:
                self._runner.abort(sub.rid)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.abort_unfinished()
        for task in self._tasks:
            task.cancel()
        for sub in self._subs:
            self._runner._inflight.discard(sub.rid)
            aclose = getattr(sub.iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass
        self._runner.metrics.request_closed()


async def until_disconnect(request: Request, work: Awaitable[Any],
                           on_disconnect: Callable[[], Any]) -> Any:
    """Await `work`; if the client disconnects first, call `on_disconnect` (which aborts
    the engine requests), let `work` wind down and raise `ClientGone`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        on_disconnect()
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    logger.info("client disconnected; aborting its request(s)")
    on_disconnect()
    try:
        await asyncio.wait_for(task, timeout=30)
    except BaseException:
        pass
    raise ClientGone()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""
