"""Typed errors at the engine boundary. The server maps them to HTTP status codes."""

from __future__ import annotations


class ReAttnError(Exception):
    """Base of every error this package raises on purpose."""

    status_code = 500


class InvalidArgument(ReAttnError, ValueError):
    """A bad engine or server option (a flag, a constructor keyword)."""

    status_code = 400


class InvalidRequest(ReAttnError, ValueError):
    """A bad request: prompt, sampling parameters, grammar, logprob options."""

    status_code = 400


class ContextTooLong(InvalidRequest):
    """The prompt (plus max_new_tokens) does not fit the context limit."""


class ModelLoadError(ReAttnError):
    """The model cannot be loaded: unknown architecture, missing tensor, wrong shape."""


class EngineDead(ReAttnError):
    """The engine loop died; no more requests are accepted."""

    status_code = 503


class StoreFullError(ReAttnError):
    """The disk tier is full and nothing unpinned is left to evict (the store's StoreFull)."""

    status_code = 507


class StoreReadOnly(ReAttnError):
    """A write to a disk tier opened read-only (--kv-store-readonly)."""

    status_code = 409


class ContextIncomplete(ReAttnError):
    """A named context lost chunks (evicted or damaged) and cannot be used as it was."""

    status_code = 409
