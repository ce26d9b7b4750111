"""JSON error bodies, request-body parsing and the pure-ASGI API-key middleware.

Error bodies carry both shapes SGLang clients read: the flat OpenAI-server shape SGLang
returns (`{"object": "error", "message", "type", "param", "code"}`) and the nested
`{"error": {"message", "type", "code"}}` that the OpenAI SDK and `sgl.Runtime` read.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from sglang_reattn.errors import ReAttnError
from sglang_reattn.kv_store import StoreFull

M = TypeVar("M", bound=BaseModel)

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          409: "ConflictError", 413: "RequestTooLargeError", 500: "InternalServerError",
          503: "ServiceUnavailableError", 507: "InsufficientStorageError"}


def dumps(obj: Any) -> bytes:
    """Compact JSON; numpy scalars and arrays (which engine outputs may carry) as numbers."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      default=_to_builtin).encode()


def _to_builtin(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    err_type = _TYPES.get(status, "BadRequestError" if status < 500 else "ServerError")
    inner = {"message": message, "type": err_type, "param": param, "code": status}
    return {"object": "error", **inner, "error": inner}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def status_of(exc: BaseException) -> int:
    """HTTP status of an exception raised by the engine."""
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, ReAttnError):
        return int(exc.status_code)
    if isinstance(exc, StoreFull):  # a disk-tier write the engine did not wrap
        return 507
    if isinstance(exc, (ValueError, TypeError)):
        return 400  # the engine's validation errors that are not (yet) typed
    return 500


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field.path: message`, without pydantic's union branch names."""
    lines = []
    seen = set()
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not _is_branch(p)]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        line = f"{'.'.join(loc)}: {msg}" if loc else msg
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "invalid request: " + "; ".join(lines)


def _is_branch(part: Any) -> bool:
    s = str(part)
    return "[" in s or s in ("str", "int", "float", "bool", "dict")


async def read_body(request: Request, max_bytes: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise HTTPError(413, f"request body of {length} bytes is over the limit of "
                             f"{max_bytes} bytes (--max-request-bytes)")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HTTPError(413, f"request body is over the limit of {max_bytes} bytes "
                                 "(--max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_json(request: Request, model: type[M], max_bytes: int) -> M:
    """Read, size-check, decode and validate a JSON body; every failure is an HTTPError."""
    body = await read_body(request, max_bytes)
    if not body.strip():
        raise HTTPError(400, "the request body is empty; expected a JSON object")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, f"expected a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise HTTPError(400, format_validation_error(e)) from None


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every HTTP route except /health."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS \
                or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        got = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(got, self._expected):
            msg = "missing API key" if not got else "invalid API key"
            response = error_response(401, msg + "; send 'Authorization: Bearer <key>'")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
