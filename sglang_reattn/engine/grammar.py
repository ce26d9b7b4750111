"""Constrained decoding with xgrammar: regex, JSON schema and EBNF."""

from __future__ import annotations

import threading
from functools import lru_cache

import torch

from sglang_reattn.engine.sampling_params import SamplingParams
from sglang_reattn.errors import InvalidRequest


class GrammarBackend:
    """Compiles grammars once (LRU) and hands out a fresh matcher per request."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._lock = threading.Lock()
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    def _compile_uncached(self, kind: str, source: str):
        with self._lock:
            if kind == "regex":
                return self._compiler.compile_regex(source)
            if kind == "json_schema":
                return self._compiler.compile_json_schema(source)
            return self._compiler.compile_grammar(source)

    def compile(self, params: SamplingParams):
        """Compile the request's grammar, or None. Raises InvalidRequest on a bad grammar."""
        for kind in ("regex", "json_schema", "ebnf"):
            source = getattr(params, kind)
            if source is None:
                continue
            try:
                return self._compile(kind, source)
            except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError subclasses
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InvalidRequest(f"invalid {kind}: {msg}") from None
        return None

    def matcher(self, compiled) -> "Matcher":
        return Matcher(self._xgr, compiled, self.vocab_size)


class Matcher:
    def __init__(self, xgr, compiled, vocab_size: int) -> None:
        self._xgr = xgr
        self._m = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask_logits(self, logits: torch.Tensor) -> None:
        """logits [vocab] float32 on CPU or GPU, masked in place."""
        self._m.fill_next_token_bitmask(self._bitmask, 0)
        row = logits.view(1, -1)
        self._xgr.apply_token_bitmask_inplace(row, self._bitmask.to(row.device))

    def accept(self, token: int) -> bool:
        return self._m.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self._m.is_terminated()
