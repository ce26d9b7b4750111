"""Sampling parameters with SGLang's names, defaults and validation."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from sglang_reattn.errors import InvalidRequest

_EPS = 1e-6
TOP_K_ALL = 1 << 30


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = None
    json_schema: str | dict | None = None
    ebnf: str | None = None
    n: int = 1
    seed: int | None = None
    sampling_seed: int | None = None
    stop_strs: list[str] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SamplingParams":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidRequest(
                f"unknown sampling parameter(s): {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(names))}"
            )
        d = {k: v for k, v in d.items() if v is not None or k in ("stop", "regex", "json_schema")}
        p = cls(**d)
        p.verify()
        return p

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def effective_seed(self) -> int | None:
        return self.sampling_seed if self.sampling_seed is not None else self.seed

    def verify(self) -> None:
        _int("max_new_tokens", self.max_new_tokens, lo=0)
        _int("min_new_tokens", self.min_new_tokens, lo=0)
        _int("n", self.n, lo=1)
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequest(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                f"({self.max_new_tokens})"
            )
        _num("temperature", self.temperature, lo=0.0)
        _num("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        _num("min_p", self.min_p, lo=0.0, hi=1.0)
        _int("top_k", self.top_k)
        if self.top_k != -1 and self.top_k < 1:
            raise InvalidRequest(f"top_k must be -1 (disabled) or at least 1, got {self.top_k}")
        _num("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _num("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _num("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True, hi=2.0)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be a boolean, got {getattr(self, name)!r}")
        for name in ("seed", "sampling_seed"):
            v = getattr(self, name)
            if v is not None:
                _int(name, v)
        stop = self.stop
        if stop is None:
            self.stop_strs = []
        elif isinstance(stop, str):
            self.stop_strs = [stop] if stop else []
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            self.stop_strs = [s for s in stop if s]
        else:
            raise InvalidRequest(f"stop must be a string or a list of strings, got {stop!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0
                for t in self.stop_token_ids
            ):
                raise InvalidRequest("stop_token_ids must be a list of non-negative integers")
        constraints = [x for x in (self.regex, self.json_schema, self.ebnf) if x is not None]
        if len(constraints) > 1:
            raise InvalidRequest("only one of regex, json_schema and ebnf may be set")
        if self.regex is not None and not isinstance(self.regex, str):
            raise InvalidRequest("regex must be a string")
        if isinstance(self.json_schema, dict):
            self.json_schema = json.dumps(self.json_schema)
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            raise InvalidRequest("json_schema must be a JSON string or an object")
        if self.top_k == -1:
            self.top_k = TOP_K_ALL
        if self.temperature < _EPS:
            # Greedy, as SGLang does: keep the argmax.
            self.temperature = 1.0
            self.top_k = 1


def _int(name: str, v: Any, lo: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidRequest(f"{name} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise InvalidRequest(f"{name} must be >= {lo}, got {v}")


def _num(name: str, v: Any, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
        raise InvalidRequest(f"{name} must be a number, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidRequest(f"{name} must be {bound}, got {v}")
    if hi is not None and v > hi:
        raise InvalidRequest(f"{name} must be <= {hi}, got {v}")
