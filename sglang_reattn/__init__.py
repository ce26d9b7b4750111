"""sglang_reattn: an SGLang-compatible server with ReAttention.

Bounded attention scope, unbounded context."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import sglang_reattn.kv_store` must not pull in torch and the engine.
    if name == "Engine":
        from sglang_reattn.engine.engine import Engine

        return Engine
    if name == "EngineArgs":
        from sglang_reattn.config import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'sglang_reattn' has no attribute {name!r}")


__all__ = ["Engine", "EngineArgs", "__version__"]
