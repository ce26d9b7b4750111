"""The offline `Engine`, shaped like `sglang.Engine`.

Callers (user code, the HTTP server) validate and tokenize in their own thread and hand
`Request`s to one engine thread that owns the scheduler, the KV pool and the model.
Results come back through per-request callbacks: a `queue.Queue` for blocking callers,
an `asyncio.Queue` (via `call_soon_threadsafe`) for async ones.
"""

from __future__ import annotations

import array
import asyncio
import gc
import itertools
import logging
import queue
import sys
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterator

import numpy as np
import torch

from sglang_reattn import __version__
from sglang_reattn.config import KV_STORE_AUTO, EngineArgs, resolve_reattn
from sglang_reattn.engine.contexts import NamedContexts
from sglang_reattn.engine.grammar import GrammarBackend
from sglang_reattn.engine.model_runner import ModelRunner
from sglang_reattn.engine.request import LogprobOptions, Request
from sglang_reattn.engine.sampling_params import SamplingParams
from sglang_reattn.engine.scheduler import Scheduler
from sglang_reattn.errors import ContextTooLong, EngineDead, InvalidArgument, InvalidRequest
from sglang_reattn.kernels._triton_compat import next_pow2
from sglang_reattn.layers.attention import KVPool, PagedAttention
from sglang_reattn.layers.reattention import ReAttention
from sglang_reattn.models import loader
from sglang_reattn.models.rope import RopeTable

logger = logging.getLogger("sglang_reattn")

_CPU_KV_BUDGET = 2 << 30
_STREAMED_CONTEXT = 1 << 40  # context length when streaming: the store bounds it
SWITCH_INTERVAL_S = 1e-4  # the interpreter's thread switch interval with a disk tier
GC_IDLE_S = 2.0  # idle this long, the engine collects the garbage it froze (Scheduler)


class Engine(NamedContexts):
    def __init__(self, model_path: str | None = None, **options: Any) -> None:
        self.args = args = EngineArgs.from_kwargs(model_path, **options)
        logging.basicConfig(level=args.log_level.upper(),
                            format="[%(asctime)s %(name)s] %(message)s")
        torch.manual_seed(args.random_seed)
        self.device = _resolve_device(args.device)
        self.dtype = _resolve_dtype(args.dtype, self.device, args.quantization)
        self._grammar: GrammarBackend | None = None
        self._grammar_lock = threading.Lock()
        self._init_contexts()
        self._inbox: queue.Queue = queue.Queue()
        self._stopped = False
        self._dead: str | None = None
        # All torch work, loading included, happens on the engine thread: with OpenMP, a
        # thread that computes while another thread owns a warm thread team runs about
        # 1.3-2x slower on the CPU (measured on 2 cores), so the caller's thread stays
        # torch-free.
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            self._stopped = True
            raise self._init_error

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
            self._init_error = e
            if getattr(self, "store_tier", None) is not None:
                self.store_tier.close()  # a later Engine may open the same store
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    def _setup(self) -> None:
        args = self.args
        t0 = time.perf_counter()
        self.model_path = loader.resolve_model_path(args.model_path)
        self.model, self.model_config = loader.load_model(
            self.model_path, self.dtype, self.device, dummy=args.load_format == "dummy")
        if args.quantization == "gguf":
            self._quantize_gguf(loader)
        self.tokenizer = loader.load_tokenizer(args.tokenizer_path or self.model_path)
        cfg = self.model_config
        self.served_model_name = args.served_model_name or (
            args.model_path or f"HuggingFaceTB/{loader.DEFAULT_MODEL_NAME}")
        trained = cfg.max_position_embeddings
        self.reattn = None if args.disable_reattn else resolve_reattn(args, trained)
        self.eos_ids = frozenset(
            set(cfg.eos_token_ids)
            | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        )
        c = args.reattn_chunk_size
        num_pages = self._num_pages()
        capacity = (num_pages - 2) * c
        # Full attention is bounded by the trained length; ReAttention only by the KV pool,
        # or, streaming from the disk tier, by the store (a prompt that is neither stored
        # nor fits the pool is refused at admission).
        streaming = args.streaming and self.reattn is not None
        self.context_length = args.context_length or (
            trained if self.reattn is None else _STREAMED_CONTEXT if streaming else capacity)
        if self.context_length > capacity and not streaming:
            raise InvalidArgument(
                f"--context-length {self.context_length} exceeds the KV pool of {capacity} "
                f"tokens; raise --max-total-tokens or --mem-fraction-static")
        use_triton = self.device.type == "cuda" and (
            cfg.sliding_window is None or self.reattn is not None)
        self.pool = KVPool(cfg.num_layers, num_pages, c, cfg.num_kv_heads, cfg.head_dim,
                           self.dtype, self.device, heads_first=not use_triton)
        scope_max = trained if self.reattn is not None else self.context_length
        self.rope = RopeTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.device,
                              initial=scope_max + c)
        if self.reattn is not None:
            virtual = -(-args.kv_stream_max_tokens // c) if streaming else 0
            # runners-up loaded ahead: up to twice the top-k rounded to a power of two (the
            # selection kernel's sort width), and at most half the chunk cache's room past
            # one selection (more evicts blocks a drifting selection comes back to)
            topk = self.reattn.topk
            spare = 0 if args.disable_kv_prefetch else max(0, min(
                next_pow2(2 * topk) - topk, (args.kv_chunk_cache_pages - topk) // 2)
                if args.kv_prefetch_runners is None else args.kv_prefetch_runners)
            self.attn = ReAttention(self.pool, self.rope, cfg.num_heads, cfg.head_dim,
                                    self.reattn, args.reattn_summary, args.reattn_combine,
                                    use_triton=use_triton, rot_limit=scope_max,
                                    num_virtual=virtual, spare=spare)
        else:
            self.attn = PagedAttention(self.pool, self.rope, cfg.num_heads, cfg.head_dim,
                                       cfg.sliding_window, use_triton=use_triton,
                                       rot_limit=scope_max)
        self.runner = ModelRunner(
            self.model, self.pool, self.attn, self.device,
            max_pages_per_seq=(min(self.context_length, capacity) + c - 1) // c + 2,
            use_cuda_graph=use_triton and not args.disable_cuda_graph,
            cuda_graph_max_bs=min(args.cuda_graph_max_bs, args.max_running_requests),
            prefill_graph_tokens=args.chunked_prefill_size,
        )
        if streaming:
            self._check_chunk_cache()
        self.store_tier = None
        self.kv_store_dir = None  # the disk tier's resolved directory, None when off
        if args.store_path:
            from sglang_reattn.engine.store_tier import (
                StoreTier,
                default_store_path,
                engine_fingerprint,
            )

            fp = engine_fingerprint(cfg, self.dtype, c, self.tokenizer, self.model)
            path = args.store_path
            if path == KV_STORE_AUTO:
                path = default_store_path(self.model_path, fp)
            refresh = self.attn.pages_loaded
            self.store_tier = StoreTier(path, fp, args.kv_store_capacity,
                                        args.kv_store_codec, self.pool, refresh,
                                        readonly=args.kv_store_readonly)
            self.kv_store_dir = path
            logger.info("disk tier: %s%s", path,
                        " (read-only)" if args.kv_store_readonly else "")
        self.stream_tier = self._stream_tier() if streaming else None
        if self.store_tier is not None:
            # The disk tier's writer and prefetch threads run Python while the engine thread
            # waits on the device. Each time the engine thread gives up the interpreter
            # (a device sync, a copy) it then waits for one of them to yield it: up to the
            # switch interval, 5 ms by default, per sync while they are busy
            # (benchmarks/bench_switch_interval.py: 5.4 ms at 5 ms, 0.46 ms at 0.1 ms).
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.scheduler = Scheduler(self.runner, self.pool, self.tokenizer, c,
                                   args.max_running_requests, args.chunked_prefill_size,
                                   use_radix=not args.disable_radix_cache,
                                   store=self.store_tier, stream=self.stream_tier,
                                   reattn=self.reattn,
                                   resident_max_tokens=args.kv_resident_max_tokens)
        self._sample_gen = torch.Generator(device=self.device).manual_seed(args.random_seed)
        logger.info("engine ready: %s on %s/%s, %d KV pages of %d tokens, in %.1fs",
                    cfg.architecture, self.device, self.dtype, self.pool.num_pages, c,
                    time.perf_counter() - t0)

    def _check_chunk_cache(self) -> None:
        """The chunk cache fits a step's selection and leaves a streamed sequence room."""
        n, topk = self.args.kv_chunk_cache_pages, self.reattn.topk
        if n < topk:
            raise InvalidArgument(
                f"--kv-chunk-cache-pages ({n}) must be at least --reattn-topk ({topk}): one "
                f"step's selection of a streamed sequence must fit the chunk cache")
        left = self.pool.num_free - n
        need = (self.reattn.sink + self.reattn.local + self.args.chunked_prefill_size) \
            // self.args.reattn_chunk_size + 2
        if left < need:
            raise InvalidArgument(
                f"--kv-chunk-cache-pages ({n}) leaves {max(left, 0)} of the KV pool's "
                f"{self.pool.num_free} pages; a streamed sequence needs {need} resident "
                f"(sink, local window, a prefill piece): lower it or raise --max-total-tokens")

    def _stream_tier(self):
        """The streaming tier: chunk-cache pages taken from the pool, the host tier."""
        from sglang_reattn.engine.store_tier import parse_bytes
        from sglang_reattn.engine.stream_tier import StreamTier

        n = self.args.kv_chunk_cache_pages
        tier = StreamTier(self.store_tier, self.pool, self.attn, self.pool.allocate(n),
                          parse_bytes(self.args.kv_host_cache_size),
                          prefetch=not self.args.disable_kv_prefetch)
        self.attn.stream = tier
        # Loading a streamed prompt's likely first decode chunks ahead of that step spares
        # it replays of its CUDA graph. Decoding eagerly, a miss is fetched in its layer as
        # the step runs at the cost of a load ahead, so the guesses would only add reads
        # (bench_first_step, default model, 16K tokens: 506 chunks read to spare 151 of
        # the first step's 160 misses).
        tier.expect_next = any(key[1] == "stream" for key in self.runner.graphs)
        # A graph step's engine thread waits for the device after its replay: the last
        # step's loads ahead run there instead of before the replay.
        tier.defer_prefetch = tier.expect_next
        logger.info("streaming tier: %d chunk-cache pages, host tier %s", n,
                    self.args.kv_host_cache_size)
        return tier

    def _num_pages(self) -> int:
        cfg, c = self.model_config, self.args.reattn_chunk_size
        want = self.args.context_length or cfg.max_position_embeddings
        streaming = self.args.streaming and not self.args.disable_reattn
        if self.args.max_total_tokens is not None:
            tokens = self.args.max_total_tokens
            if streaming:  # the size asked for, whatever the context length: what the
                return tokens // c + 2  # pool cannot hold is streamed from the store
        else:
            bpt = KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype)
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * self.args.mem_fraction_static)
            else:
                budget = _CPU_KV_BUDGET
            if streaming:
                # the streaming tier's summary rows: min and max per streamed chunk, as many
                # bytes as one token's K and V
                budget -= bpt * self.args.kv_stream_max_tokens // c
            tokens = max(budget // bpt, 2 * want)
        return max(tokens // c, (want + c - 1) // c) + 2

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        sched = self.scheduler
        while not self._stopped:
            # idle with frozen objects: wake after GC_IDLE_S to collect them (Scheduler)
            idle = not sched.has_work()
            collect = idle and sched.gc_pending
            try:
                item = self._inbox.get(block=idle, timeout=GC_IDLE_S if collect else None)
                collect = False
                self._handle(item)
                while True:
                    self._handle(self._inbox.get_nowait())
            except queue.Empty:
                if collect:
                    sched.collect_idle()
                    continue
            if self._stopped:
                break
            try:
                sched.step()
            except Exception as e:  # noqa: BLE001 - keep serving; fail only what was running
                logger.exception("engine step failed; aborting in-flight requests")
                sched.abort_all(f"internal error: {type(e).__name__}: {e}")
        sched.abort_all("engine shut down")
        if sched.gc_pending:  # what it froze is the collector's again (this engine's cycles)
            gc.unfreeze()
        if self.stream_tier is not None:
            self.stream_tier.close()
        if self.store_tier is not None:
            self.store_tier.close()

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "add":
            self.scheduler.add(item[1])
        elif kind == "abort":
            self.scheduler.abort(item[1])
        elif kind == "call":
            fn, box, done = item[1], item[2], item[3]
            try:
                box.append(fn())
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                box.append(e)
            done.set()
        elif kind == "stop":
            self._stopped = True

    def _call(self, fn):
        """Run `fn` on the engine thread (between steps) and return its result."""
        if self._stopped:
            raise EngineDead("engine is shut down")
        box: list[Any] = []
        done = threading.Event()
        self._inbox.put(("call", fn, box, done))
        done.wait()
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    # ------------------------------------------------------------------ request building

    def _grammar_backend(self) -> GrammarBackend:
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size)
            return self._grammar

    def _build(self, prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
               top_logprobs_num, return_text_in_logprobs, stream, rid, extra_key,
               prefix=None) -> tuple[list[tuple[str, list[int], SamplingParams, LogprobOptions]],
                                     bool]:
        """Validate and tokenize; returns ([(rid, ids, ids as an int64 array, params, logprob
        opts)], is_batch). prefix: an int64 array of every prompt's first ids, read from
        the store (a named context's): only the ids after it are checked for type."""
        skip = 0 if prefix is None else len(prefix)
        if (prompt is None) == (input_ids is None):
            raise InvalidRequest("exactly one of prompt (text) and input_ids must be given")
        if prompt is not None:
            is_batch = isinstance(prompt, list)
            prompts = prompt if is_batch else [prompt]
            if not all(isinstance(p, str) for p in prompts):
                raise InvalidRequest("prompt must be a string or a list of strings")
            ids_list = [self.tokenizer.encode(p) if p else [] for p in prompts]
        else:
            is_batch = bool(input_ids) and isinstance(input_ids[0], list)
            ids_list = input_ids if is_batch else [input_ids]
            for ids in ids_list:
                if not isinstance(ids, list):
                    raise InvalidRequest("input_ids must be a list of ints or a list of lists")
        if not ids_list:
            raise InvalidRequest("empty batch")
        n_prompts = len(ids_list)
        sp_list = (sampling_params if isinstance(sampling_params, list)
                   else [sampling_params] * n_prompts)
        if len(sp_list) != n_prompts:
            raise InvalidRequest(f"{len(sp_list)} sampling_params for {n_prompts} prompts")
        rids = rid if isinstance(rid, list) else [rid] * n_prompts
        if len(rids) != n_prompts:
            raise InvalidRequest(f"{len(rids)} rids for {n_prompts} prompts")
        lp = _logprob_options(return_logprob, logprob_start_len, top_logprobs_num,
                              return_text_in_logprobs)
        out = []
        vocab = self.model_config.vocab_size
        for i, (ids, sp, r) in enumerate(zip(ids_list, sp_list, rids)):
            if not ids:
                raise InvalidRequest("prompt is empty")
            rest = _int_array(ids, skip)  # also the disk tier's input for chunk ids
            arr = np.concatenate([prefix, rest]) if skip and rest is not None else rest
            if arr is None or arr.min() < 0 or arr.max() >= vocab:
                raise InvalidRequest(f"input_ids must be in [0, {vocab})")
            params = SamplingParams.from_dict(sp)
            total = len(ids) + params.max_new_tokens
            if len(ids) >= self.context_length or total > self.context_length:
                raise ContextTooLong(
                    f"requested {total} tokens ({len(ids)} prompt + {params.max_new_tokens} "
                    f"max_new_tokens), over the context length of {self.context_length}"
                )
            if params.regex or params.json_schema or params.ebnf:
                self._grammar_backend().compile(params)
            base = r if r is not None else uuid.uuid4().hex
            if params.n == 1:
                out.append((base, ids, arr, params, lp))
            else:
                for j in range(params.n):
                    p = SamplingParams.from_dict(sp)
                    if p.effective_seed is not None:
                        p.seed, p.sampling_seed = p.effective_seed + j, None
                    out.append((f"{base}/{j}", ids, arr, p, lp))
        return out, is_batch or len(out) > 1

    def _make_request(self, rid, ids, arr, params, lp, emit, stream, extra_key, known
                      ) -> Request:
        grammar = None
        if params.regex or params.json_schema or params.ebnf:
            gb = self._grammar_backend()
            grammar = gb.matcher(gb.compile(params))
        gen = self._sample_gen
        if params.effective_seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.effective_seed)
        return Request(rid=rid, prompt_ids=list(ids), prompt_array=arr, params=params, logprob=lp,
                       namespace=extra_key or "", emit=emit, stream=stream, grammar=grammar,
                       generator=gen, eos_ids=self.eos_ids, store_ids=list(known))

    def _submit(self, items, emit_for, stream: bool, extra_key, known=()) -> None:
        """known: the disk-tier ids of the prompts' first chunks (a named context's
        chain), so they are not hashed again."""
        if self._dead or self._stopped:
            raise EngineDead("engine is shut down")
        reqs = [self._make_request(rid, ids, arr, p, lp, emit_for(i), stream, extra_key, known)
                for i, (rid, ids, arr, p, lp) in enumerate(items)]
        for r in reqs:
            self._inbox.put(("add", r))

    # ------------------------------------------------------------------ public API

    def generate(self, prompt=None, sampling_params=None, input_ids=None,
                 return_logprob: bool = False, logprob_start_len: int | None = None,
                 top_logprobs_num: int | None = None, return_text_in_logprobs: bool = False,
                 stream: bool = False, rid=None, extra_key: str | None = None,
                 context: str | None = None):
        prompt, input_ids, extra_key, chain, prefix = self._with_context(
            context, prompt, input_ids, extra_key)
        items, is_batch = self._build(prompt, sampling_params, input_ids, return_logprob,
                                      logprob_start_len, top_logprobs_num,
                                      return_text_in_logprobs, stream, rid, extra_key, prefix)
        q: queue.Queue = queue.Queue()

        def emit_for(i: int):
            return lambda out, finished: q.put((i, out, finished))

        self._submit(items, emit_for, stream, extra_key, chain)
        if stream:
            return self._stream_sync(q, len(items))
        results: list[Any] = [None] * len(items)
        pending = len(items)
        while pending:
            i, out, finished = q.get()
            if finished:
                results[i] = out
                pending -= 1
        return results if is_batch else results[0]

    def _stream_sync(self, q: queue.Queue, n: int) -> Iterator[dict[str, Any]]:
        pending = n
        while pending:
            i, out, finished = q.get()
            pending -= finished
            yield dict(out, index=i) if n > 1 else out

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None,
                             return_logprob: bool = False, logprob_start_len: int | None = None,
                             top_logprobs_num: int | None = None,
                             return_text_in_logprobs: bool = False, stream: bool = False,
                             rid=None, extra_key: str | None = None,
                             context: str | None = None):
        loop = asyncio.get_running_loop()
        chain, prefix = (), None
        if context is not None:
            prompt, input_ids, extra_key, chain, prefix = await loop.run_in_executor(
                None, self._with_context, context, prompt, input_ids, extra_key)
        # Tokenizing and compiling grammars can take long: keep them off the event loop.
        items, is_batch = await loop.run_in_executor(
            None, self._build, prompt, sampling_params, input_ids, return_logprob,
            logprob_start_len, top_logprobs_num, return_text_in_logprobs, stream, rid, extra_key,
            prefix)
        q: asyncio.Queue = asyncio.Queue()

        def emit_for(i: int):
            return lambda out, finished: loop.call_soon_threadsafe(q.put_nowait,
                                                                    (i, out, finished))

        self._submit(items, emit_for, stream, extra_key, chain)
        if stream:
            return self._stream_async(q, len(items))
        results: list[Any] = [None] * len(items)
        pending = len(items)
        while pending:
            i, out, finished = await q.get()
            if finished:
                results[i] = out
                pending -= 1
        return results if is_batch else results[0]

    async def _stream_async(self, q: asyncio.Queue, n: int) -> AsyncIterator[dict[str, Any]]:
        pending = n
        while pending:
            i, out, finished = await q.get()
            pending -= finished
            yield dict(out, index=i) if n > 1 else out

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def flush_cache(self) -> bool:
        return self._call(self.scheduler.flush_cache)

    def _quantize_gguf(self, loader) -> None:
        """--quantization gguf: the 4-bit matrices of the GGUF file (the default model's
        package file when no --model-path is given) replace the dense linear layers."""
        from sglang_reattn.layers.quant import int4_supported

        if self.device.type != "cpu":
            raise InvalidArgument("--quantization gguf runs on the CPU only (--device cpu)")
        if not int4_supported():
            raise InvalidArgument(f"--quantization gguf needs torch's CPU int4 matmul, "
                                  f"missing in torch {torch.__version__}")
        path = self.args.model_path
        if path is None:
            path = loader.default_gguf_path()
        if not path.endswith(".gguf"):
            raise InvalidArgument(f"--quantization gguf needs a .gguf model, got {path}")
        n = loader.quantize_from_gguf(self.model, self.model_config, path)
        if n == 0:
            raise InvalidArgument(f"{path} has no Q4_0/Q4_1 matrices to run quantized")
        logger.info("quantization gguf: %d linear layers run on 4-bit blocks", n)

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        with s.release_lock:  # not halfway through releasing a request already answered
            return self._stats(s)

    def _stats(self, s: Scheduler) -> dict[str, Any]:
        return {
            "num_running_reqs": len(s.running),
            "num_waiting_reqs": len(s.waiting),
            "kv_pages_free": self.pool.num_free,
            "kv_pages_total": self.pool.num_pages - 1,
            "radix_cache_pages": s.cache.num_pages if s.cache is not None else 0,
            **(self.store_tier.stats if self.store_tier is not None else {}),
            **(self.store_tier.gauges() if self.store_tier is not None else {}),
            **(self.stream_tier.counters() if self.stream_tier is not None else {}),
            **s.counters,
        }

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model_config
        return {
            "model_path": self.served_model_name,
            "tokenizer_path": self.args.tokenizer_path or self.served_model_name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": cfg.raw.get("model_type"),
            "architectures": [cfg.architecture],
            "max_position_embeddings": cfg.max_position_embeddings,
            "context_length": self.context_length,
        }

    def get_server_info(self) -> dict[str, Any]:
        info = self.args.to_dict()
        info.update({
            "version": __version__,
            "reattn": None if self.reattn is None else {
                "chunk_size": self.reattn.chunk_size, "sink": self.reattn.sink,
                "topk": self.reattn.topk, "local": self.reattn.local,
                "summary": self.args.reattn_summary, "combine": self.args.reattn_combine},
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "context_length": self.context_length,
            "kv_store_dir": self.kv_store_dir,
            "max_total_num_tokens": (self.pool.num_pages - 1) * self.pool.page_size,
            "internal_states": [self.stats()],
        })
        return info

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._inbox.put(("stop",))
        self._thread.join(timeout=60)
        self._stopped = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _int_array(ids: list, skip: int = 0) -> np.ndarray | None:
    """ids[skip:] as an int64 array, converted in one pass in C (`array.array`), which
    refuses what is not an integer (a float, a string, None, a list); InvalidRequest for
    those and for a bool (only ids of 0 or 1 can have been one: those few are looked at).
    None when one is out of int64 range (the caller's range check refuses it). Integers
    of other types (numpy's) are taken as their value. A 1M-token prompt took 42-46 ms
    as a type check then np.fromiter, 22-27 ms this way through an iterator, 15 ms from
    the list itself (2-core CI machine; 44 ms through the iterator on the H200's host)."""
    try:
        arr = np.frombuffer(array.array("q", itertools.islice(ids, skip, None) if skip
                                        else ids), np.int64)
    except TypeError:
        raise InvalidRequest("input_ids must be a list of ints or a list of lists") from None
    except OverflowError:
        return None
    if any(type(ids[skip + i]) is bool for i in np.flatnonzero(arr <= 1).tolist()):
        raise InvalidRequest("input_ids must be a list of ints or a list of lists")
    return arr


def _logprob_options(return_logprob, start, top_n, with_text) -> LogprobOptions:
    if not isinstance(return_logprob, bool):
        raise InvalidRequest("return_logprob must be a boolean")
    start = -1 if start is None else start
    top_n = 0 if top_n is None else top_n
    if not isinstance(start, int) or start < -1:
        raise InvalidRequest(f"logprob_start_len must be an integer >= -1, got {start!r}")
    if not isinstance(top_n, int) or top_n < 0:
        raise InvalidRequest(f"top_logprobs_num must be a non-negative integer, got {top_n!r}")
    return LogprobOptions(return_logprob, start, top_n, bool(with_text))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("--device cuda was given but no CUDA device is available")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device, quantization: str | None = None
                   ) -> torch.dtype:
    if quantization == "gguf":
        return torch.bfloat16
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


