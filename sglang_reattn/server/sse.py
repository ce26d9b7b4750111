"""Server-sent events as SGLang and OpenAI stream them: `data: {json}\n\n`, then `[DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse

from sglang_reattn.server.http_errors import dumps

DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """A stream whose `on_close` always runs once the response ends, however it ends:
    finished, client gone (Starlette cancels the stream), or server shutting down.
    `on_close` aborts what the engine is still generating for this response."""

    def __init__(self, content: AsyncIterator[bytes],
                 on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
