"""Command line of `launch_server`, built from the `EngineArgs` dataclass.

Every `EngineArgs` field becomes a flag of the same name (`model_path` <-> `--model-path`),
so the CLI and `Engine(**options)` can never drift apart. A few options only the HTTP
layer cares about live in `ServerOptions` and get flags the same way.

Flag groups follow the field prefixes: `--reattn-*` and `--kv-store-*` are the project's
own options, the rest mirror SGLang's names and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sglang_reattn.config import KV_STORE_AUTO, EngineArgs
from sglang_reattn.errors import InvalidArgument


@dataclass
class ServerOptions:
    """HTTP-only options: they do not change what the engine computes."""

    # Bodies above this get 413 before being parsed. Large enough for ~1M input_ids as JSON.
    max_request_bytes: int = 64 * 1024 * 1024
    # On SIGTERM/SIGINT, in-flight requests get this long to finish; then they are aborted
    # (finish_reason {"type": "abort"}) and the engine is shut down.
    shutdown_timeout: float = 10.0
    # Accepted for SGLang command-line compatibility; /metrics is always served.
    enable_metrics: bool = False

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0:
            raise InvalidArgument(
                f"--max-request-bytes must be positive, got {self.max_request_bytes}"
            )
        if self.shutdown_timeout < 0:
            raise InvalidArgument(
                f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}"
            )


_HELP = {
    "model_path": "HF directory or GGUF file of the model; default: embedded SmolLM2-135M",
    "tokenizer_path": "tokenizer directory (default: the model's)",
    "dtype": "weights and activations dtype",
    "quantization": "gguf: compute with a GGUF model's Q4_0/Q4_1 blocks as stored "
                    "(CPU, bfloat16; the default model's file when no --model-path)",
    "load_format": "auto: the checkpoint's weights; dummy: random weights of its shapes",
    "device": "cpu, cuda or auto",
    "context_length": "max prompt + output tokens (default: unbounded with ReAttention)",
    "served_model_name": "model name reported by /v1/models and responses",
    "random_seed": "seed of the sampler",
    "max_running_requests": "max requests decoded together",
    "chunked_prefill_size": "max prompt tokens prefilled per step",
    "max_total_tokens": "KV pool capacity in tokens (default: from --mem-fraction-static)",
    "mem_fraction_static": "fraction of GPU memory for weights and KV pool",
    "host": "address to bind",
    "port": "port to bind",
    "api_key": "require 'Authorization: Bearer <key>' on every route except /health",
    "log_level": "logging level (debug, info, warning, error)",
    "reattn_chunk_size": "tokens per chunk (selection, caching and storage unit)",
    "reattn_topk": "chunks selected per step (default: from the model's trained length)",
    "reattn_sink": "sink tokens always attended (default: from the model)",
    "reattn_local": "local window tokens always attended (default: from the model)",
    "reattn_summary": "chunk key summary scored against the queries: minmax or mean",
    "reattn_combine": "heads -> one selection: max (each head's scores normalized by its "
                      "largest, then summed) or sum (raw scores summed)",
    "kv_store_path": "LMDB directory of the disk tier; 'auto': one per model under "
                     "$XDG_CACHE_HOME/sglang_reattn/kv_store (~/.cache when unset). Any "
                     "number of servers may share a store",
    "kv_store_capacity": "disk tier capacity, e.g. 64GiB; least recently used unpinned "
                         "chunks are evicted beyond it",
    "kv_store_codec": "compression codec of stored chunks",
    "kv_store_readonly": "read the disk tier, never write it (no write-behind; creating, "
                         "pinning or deleting contexts answers 409)",
    "disable_kv_store": "no disk tier (launch_server otherwise uses --kv-store-path auto)",
    "kv_chunk_cache_pages": "KV pool pages set aside as the per-layer GPU chunk cache of "
                            "streamed contexts (needs ReAttention and a disk tier); a "
                            "stored prefix then keeps only sink and local pages resident "
                            "and its selected chunks are streamed; 0: off",
    "kv_host_cache_size": "host tier between the disk tier and the chunk cache (pinned "
                          "memory on CUDA), e.g. 4GiB; 0: none",
    "kv_resident_max_tokens": "a stored prefix longer than this streams (default: only "
                              "one that does not fit in the KV pool)",
    "kv_stream_max_tokens": "streamed tokens whose chunk summaries fit at once, over all "
                            "running requests (their summaries are allocated at start-up: "
                            "1/chunk-size of their KV bytes)",
    "disable_kv_prefetch": "do not load chunks ahead (the previous step's selection and "
                           "its runners-up) in the background",
    "kv_prefetch_runners": "candidates ranked just below each streamed selection's top k "
                           "(per layer) that are loaded ahead (default: up to the top-k "
                           "again, within half the chunk cache's room past one selection; "
                           "0: the selection alone)",
    "max_request_bytes": "HTTP bodies larger than this get 413",
    "shutdown_timeout": "seconds in-flight requests get to finish on SIGTERM before abort",
    "enable_metrics": "accepted for SGLang compatibility; /metrics is always on",
}

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# Where the command lines' defaults differ from the offline Engine's: the server and the
# ingest CLI keep a disk tier by default, the Engine only when asked for one.
_CLI_DEFAULTS = {"kv_store_path": KV_STORE_AUTO}


def _scalar_type(annotation: Any) -> tuple[type, bool]:
    """(base type, optional) of a field annotation such as `int | None`."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        assert len(non_none) == 1, f"unsupported option annotation {annotation!r}"
        return non_none[0], True
    return annotation, False


def _group_of(name: str) -> str:
    if name.startswith("reattn_") or name == "disable_reattn":
        return "ReAttention (--reattn-*)"
    if name.startswith("kv_store_") or name == "disable_kv_store":
        return "disk tier (--kv-store-*)"
    if name in ("kv_chunk_cache_pages", "kv_host_cache_size", "kv_resident_max_tokens",
                "kv_stream_max_tokens", "disable_kv_prefetch", "kv_prefetch_runners"):
        return "streaming tier"
    return "SGLang-compatible options"


def _add_fields(parser: argparse.ArgumentParser, cls: type, groups: dict) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, optional = _scalar_type(hints[f.name])
        title = "HTTP server" if cls is ServerOptions else _group_of(f.name)
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        group = groups[title]
        flag = "--" + f.name.replace("_", "-")
        help_text = _HELP.get(f.name, "")
        default = _CLI_DEFAULTS.get(f.name, f.default) if cls is EngineArgs else f.default
        if base is bool:
            # False-default bools are plain switches like SGLang's --disable-radix-cache;
            # a True default also gets its --no-* form so it can be turned off.
            action = "store_true" if not default else argparse.BooleanOptionalAction
            group.add_argument(flag, dest=f.name, action=action, default=default,
                               help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "type": base,
                                  "help": help_text + (f" (default: {default})"
                                                       if default is not None else "")}
        if f.name == "log_level":
            kwargs["choices"] = _LOG_LEVELS
            kwargs["type"] = str.lower
        if "choices" not in kwargs:
            kwargs["metavar"] = base.__name__.upper()
        group.add_argument(flag, **kwargs)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every `EngineArgs` field as a flag, grouped like launch_server's (for other CLIs)."""
    _add_fields(parser, EngineArgs, {})


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_reattn.launch_server",
        description="SGLang-compatible server with ReAttention (unbounded context).",
        allow_abbrev=False,  # an abbreviation would accept flags SGLang does not have
    )
    groups: dict[str, Any] = {}
    _add_fields(parser, EngineArgs, groups)
    _add_fields(parser, ServerOptions, groups)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[EngineArgs, ServerOptions]:
    """Parse flags into the two dataclasses.

    An unknown flag exits 2 with argparse's message naming it; a contradictory or
    out-of-range value raises `InvalidArgument` from the dataclasses' `__post_init__`.
    """
    ns = vars(build_parser().parse_args(argv))
    engine_names = {f.name for f in dataclasses.fields(EngineArgs)}
    engine_args = EngineArgs(**{k: v for k, v in ns.items() if k in engine_names})
    server_opts = ServerOptions(**{k: v for k, v in ns.items() if k not in engine_names})
    return engine_args, server_opts
