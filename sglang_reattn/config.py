"""Engine and server options.

`EngineArgs` is the one place every option lives. Each field has the same name as the
server's command-line flag with dashes turned into underscores (`--max-running-requests`
-> `max_running_requests`), so `Engine(**options)` and `launch_server --flags` accept the
same things. Keyword arguments become an `EngineArgs` once, at the boundary; nothing
passes `**kwargs` further down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sglang_reattn.errors import InvalidArgument

_DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_STORE_AUTO = "auto"  # --kv-store-path value: a per-model directory under the user's cache
_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineArgs:
    # --- model (SGLang names) ---
    model_path: str | None = None  # None -> the embedded SmolLM2-135M-Instruct
    tokenizer_path: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    # gguf: compute with a GGUF model's 4-bit blocks as stored (CPU, bfloat16)
    quantization: str | None = None
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random (benchmarks)
    device: str = "auto"  # auto: cuda when available, else cpu
    context_length: int | None = None  # None: unbounded with ReAttention, else trained length
    served_model_name: str | None = None
    random_seed: int = 0
    trust_remote_code: bool = False
    # --- scheduling / memory (SGLang names) ---
    max_running_requests: int = 64
    chunked_prefill_size: int = 2048
    max_total_tokens: int | None = None  # KV pool capacity in tokens; None: from mem fraction
    mem_fraction_static: float = 0.6
    disable_radix_cache: bool = False
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 32
    # --- server (SGLang names) ---
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    log_level: str = "info"
    # --- ReAttention (--reattn-*); 0 / None means "derive from the model" ---
    reattn_chunk_size: int = 64
    reattn_topk: int | None = None
    reattn_sink: int | None = None
    reattn_local: int | None = None
    reattn_summary: str = "minmax"  # chunk key summary: minmax (Quest bound) | mean
    reattn_combine: str = "max"  # heads -> one selection: max (per-head normalized) | sum
    disable_reattn: bool = False
    # --- disk tier (--kv-store-*) ---
    # A directory; "auto": a per-model directory under the user's cache (the default of
    # launch_server and ingest); None: no disk tier (the offline Engine's default).
    kv_store_path: str | None = None
    kv_store_capacity: str = "64GiB"
    # zstd: on the default model's own KV, 0.84 of raw on disk against zstd-planes' 0.82, but
    # written 1.6-2.2x and read 1.0-1.5x as fast (bench_store.py --real-kv 8192, three runs,
    # 2-core CPU); raw reads about 5x faster still and takes 1.10 of the KV's bytes
    kv_store_codec: str = "zstd"
    kv_store_readonly: bool = False  # read the store, never write it
    disable_kv_store: bool = False
    # --- streaming tier (issue 5): needs ReAttention and a disk tier ---
    # Pool pages set aside as the per-layer GPU chunk cache of streamed contexts; 0: off
    # (a stored prefix is loaded whole into the pool, as before).
    kv_chunk_cache_pages: int = 0
    kv_host_cache_size: str = "1GiB"  # host tier (pinned on CUDA) between LMDB and the cache
    # A stored prefix longer than this streams; None: only when it does not fit the pool.
    kv_resident_max_tokens: int | None = None
    disable_kv_prefetch: bool = False  # no background loads of the previous selection
    # Runners-up per layer each streamed selection also ranks (its prefetch hint); None:
    # up to the top-k again, within half the chunk cache's room past one selection.
    kv_prefetch_runners: int | None = None
    # Streamed tokens whose chunk summaries can be attached at once (summed over running
    # requests); their summary rows are allocated up front (1/chunk of their KV bytes).
    kv_stream_max_tokens: int = 2 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise InvalidArgument(f"--dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise InvalidArgument(
                f"--load-format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.quantization not in (None, "gguf"):
            raise InvalidArgument(
                f"--quantization must be 'gguf' or unset, got {self.quantization!r}")
        if self.quantization == "gguf" and self.dtype not in ("auto", "bfloat16"):
            raise InvalidArgument(
                f"--quantization gguf computes in bfloat16; got --dtype {self.dtype}")
        if self.quantization == "gguf" and self.device == "cuda":
            raise InvalidArgument("--quantization gguf runs on the CPU only (--device cpu)")
        if self.device not in _DEVICES:
            raise InvalidArgument(f"--device must be one of {_DEVICES}, got {self.device!r}")
        _positive("max_running_requests", self.max_running_requests)
        _positive("chunked_prefill_size", self.chunked_prefill_size)
        _positive("cuda_graph_max_bs", self.cuda_graph_max_bs)
        _positive("reattn_chunk_size", self.reattn_chunk_size)
        if self.context_length is not None:
            _positive("context_length", self.context_length)
        if self.max_total_tokens is not None:
            _positive("max_total_tokens", self.max_total_tokens)
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise InvalidArgument(
                f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}"
            )
        if self.chunked_prefill_size % self.reattn_chunk_size != 0:
            raise InvalidArgument(
                f"--chunked-prefill-size ({self.chunked_prefill_size}) must be a multiple of "
                f"--reattn-chunk-size ({self.reattn_chunk_size}) so prefill chunks stay aligned"
            )
        if self.reattn_summary not in ("minmax", "mean"):
            raise InvalidArgument(
                f"--reattn-summary must be minmax or mean, got {self.reattn_summary!r}")
        if self.reattn_combine not in ("sum", "max"):
            raise InvalidArgument(
                f"--reattn-combine must be sum or max, got {self.reattn_combine!r}")
        for name in ("reattn_topk", "reattn_sink", "reattn_local"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                flag = "--" + name.replace("_", "-")
                raise InvalidArgument(f"{flag} must be a non-negative integer, got {v!r}")
        if self.disable_kv_store and self.kv_store_path not in (None, KV_STORE_AUTO):
            raise InvalidArgument("--disable-kv-store contradicts --kv-store-path "
                                  f"{self.kv_store_path!r}; give one of them")
        if self.kv_store_path is not None and not self.kv_store_path.strip():
            raise InvalidArgument("--kv-store-path must not be empty")
        self._check_streaming()
        if not 0 <= self.port < 65536:
            raise InvalidArgument(f"--port must be in [0, 65535], got {self.port}")

    def _check_streaming(self) -> None:
        n = self.kv_chunk_cache_pages
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InvalidArgument(
                f"--kv-chunk-cache-pages must be a non-negative integer, got {n!r}")
        r = self.kv_prefetch_runners
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
            raise InvalidArgument(
                f"--kv-prefetch-runners must be a non-negative integer, got {r!r}")
        m = self.kv_stream_max_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise InvalidArgument(
                f"--kv-stream-max-tokens must be a positive integer, got {m!r}")
        if self.kv_resident_max_tokens is not None and (
                not isinstance(self.kv_resident_max_tokens, int)
                or self.kv_resident_max_tokens < 0):
            raise InvalidArgument("--kv-resident-max-tokens must be a non-negative integer, "
                                  f"got {self.kv_resident_max_tokens!r}")
        try:
            from sglang_reattn.engine.store_tier import parse_bytes

            size = parse_bytes(str(self.kv_host_cache_size))
        except ValueError:
            size = -1
        if size < 0:
            raise InvalidArgument("--kv-host-cache-size must be a size such as 512MiB, 4GiB "
                                  f"or 0, got {self.kv_host_cache_size!r}")
        if n and self.disable_reattn:
            raise InvalidArgument("--kv-chunk-cache-pages streams the chunks ReAttention "
                                  "selects; it cannot be used with --disable-reattn")
        if n and self.reattn_summary != "minmax":
            raise InvalidArgument("--kv-chunk-cache-pages scores streamed chunks by the "
                                  "store's min/max summaries; use --reattn-summary minmax")

    @property
    def streaming(self) -> bool:
        """The streaming tier is requested (it also needs a disk tier)."""
        return self.kv_chunk_cache_pages > 0 and self.store_path is not None

    @classmethod
    def from_kwargs(cls, model_path: str | None = None, **options: Any) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InvalidArgument(
                f"unknown engine option(s): {', '.join(unknown)}; "
                f"valid options: {', '.join(sorted(names))}"
            )
        return cls(model_path=model_path, **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def store_path(self) -> str | None:
        """The disk tier's directory as given (KV_STORE_AUTO unresolved), None when off."""
        return None if self.disable_kv_store else self.kv_store_path


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        flag = "--" + name.replace("_", "-")
        raise InvalidArgument(f"{flag} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ReAttnConfig:
    """Resolved ReAttention scope: sink + topk chunks + local window, in tokens."""

    enabled: bool
    chunk_size: int
    sink: int
    topk: int
    local: int

    @property
    def scope_tokens(self) -> int:
        return self.sink + self.topk * self.chunk_size + self.local


def resolve_reattn(args: EngineArgs, trained_len: int) -> ReAttnConfig:
    """Scope sizes from the flags, defaulting from the model's trained length so that no
    virtual position ever exceeds it: sink + topk*C + local + C (alignment) + the largest
    prefill piece must fit in `trained_len`."""
    c = args.reattn_chunk_size
    piece = args.chunked_prefill_size
    sink = c if args.reattn_sink is None else args.reattn_sink
    local = (trained_len // 4) // c * c if args.reattn_local is None else args.reattn_local
    for name, v in (("--reattn-sink", sink), ("--reattn-local", local)):
        if v % c:
            raise InvalidArgument(f"{name} ({v}) must be a multiple of --reattn-chunk-size ({c})")
    if local < c:
        raise InvalidArgument(f"--reattn-local ({local}) must be at least one chunk ({c})")
    fixed = sink + local + c + piece
    topk = (trained_len - fixed) // c if args.reattn_topk is None else args.reattn_topk
    if topk < 1:
        raise InvalidArgument(
            f"no room for selected chunks: sink {sink} + local {local} + chunk {c} + "
            f"chunked-prefill-size {piece} = {fixed} tokens leave nothing of the model's "
            f"trained length {trained_len}; lower --reattn-local or --chunked-prefill-size")
    cfg = ReAttnConfig(not args.disable_reattn, c, sink, topk, local)
    if cfg.scope_tokens + c + piece > trained_len:
        raise InvalidArgument(
            f"the attention scope (sink {sink} + topk {topk} x {c} + local {local} + chunk {c} "
            f"+ prefill piece {piece} = {cfg.scope_tokens + c + piece} tokens) exceeds the "
            f"model's trained length {trained_len}; lower --reattn-topk, --reattn-local or "
            f"--chunked-prefill-size")
    return cfg


__all__ = ["KV_STORE_AUTO", "EngineArgs", "ReAttnConfig", "resolve_reattn"]
