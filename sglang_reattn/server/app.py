"""FastAPI application: SGLang's native routes, the OpenAI routes and /metrics.

`create_app(engine, engine_args, server_options)` takes an already built engine, so tests
and `launch_server` share it. Engine calls that may block (info, flush, stats, shutdown)
run in worker threads; generation goes through `Engine.async_generate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglang_reattn.config import EngineArgs
from sglang_reattn.errors import ReAttnError
from sglang_reattn.server import openai_api
from sglang_reattn.server.args import ServerOptions
from sglang_reattn.server.http_errors import (
    APIKeyMiddleware,
    HTTPError,
    JSONResponse,
    error_response,
    parse_json,
    status_of,
)
from sglang_reattn.server.metrics import CONTENT_TYPE, ServerMetrics
from sglang_reattn.server.protocol import ContextRequest, GenerateRequest, SamplingParams
from sglang_reattn.server.runner import ClientGone, GenerateItem, Runner
from sglang_reattn.server.sse import DONE, ClosingStreamingResponse, event

logger = logging.getLogger(__name__)

VERSION = "0.5.0-reattn"  # the SGLang API version this server speaks


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    rid: str = ""
    abort_all: bool = False


class ServerState:
    """What the routes share: the engine, its runner, the options and names."""

    def __init__(self, engine: Any, engine_args: EngineArgs, opts: ServerOptions) -> None:
        self.engine = engine
        self.engine_args = engine_args
        self.opts = opts
        self.model_name = str(getattr(engine, "served_model_name", None)
                              or engine_args.served_model_name or "default")
        self.metrics = ServerMetrics(self.model_name, engine.stats)
        self.runner = Runner(engine, self.metrics)
        self.created = int(time.time())

    async def parse(self, request: Request, model: type) -> Any:
        return await parse_json(request, model, self.opts.max_request_bytes)


def create_app(engine: Any, engine_args: EngineArgs, opts: ServerOptions | None = None
               ) -> FastAPI:
    state = ServerState(engine, engine_args, opts or ServerOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # SGLang's own line: scripts that start a server wait for it.
        logger.info("The server is fired up and ready to roll!")
        yield
        state.runner.draining = True
        state.runner.abort_all()
        await asyncio.to_thread(engine.shutdown)
        logger.info("engine shut down")

    app = FastAPI(title="sglang_reattn", version=VERSION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _install_error_handlers(app, state)
    _add_native_routes(app, state)
    openai_api.add_routes(app, state)
    if engine_args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=engine_args.api_key)
    return app


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> Response:
        state.metrics.http_error(exc.status)
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException) -> Response:
        state.metrics.http_error(exc.status_code)
        return error_response(exc.status_code, str(exc.detail))

    # Typed and value errors get their own handlers so that Starlette answers them in
    # its ExceptionMiddleware; only the catch-all goes to ServerErrorMiddleware, which
    # logs a traceback.
    @app.exception_handler(ReAttnError)
    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> Response:
        status = status_of(exc)
        if status >= 500:
            logger.exception("error while serving %s", request.url.path)
        state.metrics.http_error(status)
        return error_response(status, str(exc) or type(exc).__name__)


def _add_native_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        req: GenerateRequest = await state.parse(request, GenerateRequest)
        items = _items(req)
        if req.stream:
            tag = req.is_batch or any(item.n > 1 for item in items)
            stream = await state.runner.open_stream(request, items, "generate", tag)
            return ClosingStreamingResponse(_sse(stream), stream.close)
        outputs = await state.runner.generate(request, items, "generate")
        single = not req.is_batch and len(outputs) == 1
        return JSONResponse(outputs[0] if single else outputs)

    @app.get("/health")
    async def health() -> Response:
        if state.runner.draining:
            return error_response(503, "the server is shutting down")
        alive = getattr(engine, "is_alive", None)
        if alive is not None and not alive():
            return error_response(503, "the engine loop is not running")
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        item = GenerateItem(text="ping", sampling_params=SamplingParams(
            max_new_tokens=1, temperature=0.0).to_engine())
        try:
            await asyncio.wait_for(state.runner.generate(request, [item], "health"), 60)
        except ClientGone:
            raise
        except Exception as e:
            logger.exception("health_generate failed")
            return error_response(503, f"generation failed: {e}")
        return Response(status_code=200)

    async def model_info() -> dict[str, Any]:
        info = dict(await asyncio.to_thread(engine.get_model_info))
        # RuntimeEndpoint picks its chat template from model_path: it must be a string.
        info["model_path"] = str(info.get("model_path") or state.engine_args.model_path
                                 or state.model_name)
        info.setdefault("tokenizer_path", state.engine_args.tokenizer_path
                        or info["model_path"])
        info.setdefault("is_generation", True)
        info.setdefault("served_model_name", state.model_name)
        return info

    app.get("/model_info")(model_info)
    app.get("/get_model_info")(model_info)

    async def server_info() -> dict[str, Any]:
        info = dict(await asyncio.to_thread(engine.get_server_info))
        info.setdefault("version", VERSION)
        for key, value in state.engine_args.to_dict().items():
            info.setdefault(key, value)
        info["api_key"] = None if state.engine_args.api_key is None else "<set>"
        info["max_request_bytes"] = state.opts.max_request_bytes
        info["internal_states"] = [await asyncio.to_thread(engine.stats)]
        return info

    app.get("/server_info")(server_info)
    app.get("/get_server_info")(server_info)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        ok = await asyncio.to_thread(engine.flush_cache)
        if ok is False:
            return PlainTextResponse("Cache not flushed: requests are running; retry when "
                                     "the server is idle.", status_code=400)
        return PlainTextResponse("Cache flushed.\n", status_code=200)

    @app.get("/contexts")
    async def list_contexts() -> dict[str, Any]:
        return {"contexts": await asyncio.to_thread(engine.list_contexts)}

    @app.post("/contexts")
    async def create_context(request: Request) -> dict[str, Any]:
        req: ContextRequest = await state.parse(request, ContextRequest)
        return await asyncio.to_thread(engine.ingest, req.name, text=req.text,
                                       input_ids=req.input_ids, namespace=req.namespace,
                                       pin=req.pin)

    @app.delete("/contexts/{name}")
    async def delete_context(name: str) -> dict[str, Any]:
        await asyncio.to_thread(engine.delete_context, name)
        return {"deleted": name}

    @app.post("/contexts/{name}/pin")
    async def pin_context(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(engine.pin_context, name, True)

    @app.post("/contexts/{name}/unpin")
    async def unpin_context(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(engine.pin_context, name, False)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        req: AbortRequest = await state.parse(request, AbortRequest)
        if req.abort_all:
            state.runner.abort_all()
        elif req.rid:
            await asyncio.to_thread(engine.abort, req.rid)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await asyncio.to_thread(state.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)


def _items(req: GenerateRequest) -> list[GenerateItem]:
    try:
        return req.items()
    except ValueError as e:
        raise HTTPError(400, str(e)) from None


async def _sse(stream: Any):
    try:
        async for out in stream:
            yield event(out)
    except Exception as e:  # headers are sent: report in-band, as SGLang does
        logger.exception("error in a /generate stream")
        yield event({"error": {"message": str(e) or type(e).__name__,
                               "code": status_of(e)}})
    yield DONE
