"""A request as the scheduler sees it: tokens, KV pages, sampling state, results."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from sglang_reattn.engine.sampling_params import SamplingParams


class State(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class LogprobOptions:
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only (SGLang's default)
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False


@dataclass
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    logprob: LogprobOptions
    namespace: str
    emit: Callable[[dict[str, Any], bool], None]  # (output dict, finished)
    stream: bool = False
    grammar: Any = None  # a Matcher, or None
    generator: torch.Generator | None = None
    eos_ids: frozenset[int] = frozenset()
    prompt_array: Any = None  # prompt_ids as an int64 numpy array (the engine's check made it)
    # --- progress ---
    state: State = State.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of all_ids whose K/V are in the pool
    pages: list[int] = field(default_factory=list)  # page table, in token order
    tree_node: Any = None  # deepest locked radix node
    num_tree_pages: int = 0  # leading pages owned by the radix tree
    cached_tokens: int = 0
    num_saved: int = 0  # leading full chunks already handed to the disk tier
    streamed: bool = False  # `pages` holds virtual pages of the streaming tier
    stream_hint: dict = field(default_factory=dict)  # layer -> chunks its last step selected
    # layer -> chunks its next (decode) step will likely select, loaded before it
    stream_due: dict = field(default_factory=dict)
    store_ids: list = field(default_factory=list)  # disk-tier ids of its leading whole chunks
    spill_due: bool = False  # streamed decode: chunks left the local window, not spilled yet
    finish_reason: dict[str, Any] | None = None
    aborted: bool = False
    text: str = ""
    detok: list | None = None  # incremental detokenizer state (see detokenize.update_text)
    # --- logprobs ---
    input_logprobs: list[Any] = field(default_factory=list)
    input_top: list[Any] = field(default_factory=list)
    output_logprobs: list[Any] = field(default_factory=list)
    output_top: list[Any] = field(default_factory=list)
    # --- timing ---
    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        """Prompt and output ids, concatenated: a copy (O(length)); per-step code reads
        `token_at` / `ids_between` instead."""
        return self.prompt_ids + self.output_ids

    @property
    def tokens(self) -> "Tokens":
        """all_ids as a view: slices without building the whole list."""
        return Tokens(self)

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    def array_between(self, start: int, stop: int):
        """ids_between as a numpy array: a view of prompt_array within the prompt."""
        if self.prompt_array is not None and stop <= len(self.prompt_ids):
            return self.prompt_array[start:stop]
        return np.asarray(self.ids_between(start, stop), dtype=np.int64)

    def ids_between(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without building all_ids (0 <= start <= stop)."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n:stop - n]
        return self.prompt_ids[start:] + self.output_ids[:stop - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        # Decode feeds exactly the last sampled token; anything more is (re)prefill.
        return self.num_tokens - self.num_computed > 1 or not self.output_ids

    @property
    def wants_input_logprobs(self) -> bool:
        return self.logprob.return_logprob and 0 <= self.logprob.logprob_start_len


class Tokens:
    """A request's prompt and output ids as one read-only sequence, sliced and indexed
    without concatenating them (per-step code of million-token contexts)."""

    def __init__(self, r: Request) -> None:
        self._r = r

    def __len__(self) -> int:
        return self._r.num_tokens

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            assert step == 1, "Tokens: only contiguous slices"
            return self._r.ids_between(start, max(start, stop))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._r.token_at(i % n)
