"""Request bodies of the native API (SGLang 0.5.x `/generate`), validated by pydantic.

Models are strict (a string is not an int) and forbid unknown fields, so a typo in a
field name is a 400 that names it instead of a silently ignored option. Fields SGLang
accepts but this server does not implement (images, LoRA, sessions, ...) are allowed
only when null, so SGLang clients that send them as null keep working.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sglang_reattn.errors import InvalidRequest

STRICT = ConfigDict(extra="forbid", strict=True)

_SP_UNSUPPORTED = ("stop_regex", "structural_tag", "custom_params", "logit_bias")
_SP_NO_EFFECT = ("spaces_between_special_tokens", "stream_interval", "sampling_seed")
_REQ_UNSUPPORTED = ("image_data", "video_data", "audio_data", "input_embeds", "lora_path",
                    "lora_id", "session_id", "session_params", "custom_logit_processor",
                    "token_ids_logprob", "return_hidden_states")


def _require_null(obj: BaseModel, names: tuple[str, ...], what: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value not in (None, False, [], {}) and not _all_null(value):
            raise ValueError(f"{what} field {name!r} is not supported by this server")


def _all_null(value: Any) -> bool:
    return isinstance(value, list) and all(v is None for v in value)


class SamplingParams(BaseModel):
    """SGLang's sampling parameter names; ranges are checked by the engine."""

    model_config = STRICT

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    n: int | None = None
    seed: int | None = None
    sampling_seed: int | None = None  # SGLang's newer name of `seed`
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    # Sent by SGLang's frontend on every gen(); decoding always joins special tokens
    # the same way here, so the value is accepted and has no effect.
    spaces_between_special_tokens: bool | None = None
    stream_interval: int | None = None
    # Accepted only as null.
    stop_regex: str | list[str] | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        _require_null(self, _SP_UNSUPPORTED, "sampling_params")
        if self.seed is not None and self.sampling_seed is not None:
            raise ValueError("give either 'seed' or 'sampling_seed', not both")
        return self

    def to_engine(self) -> dict[str, Any]:
        """The dict `Engine.generate` takes: SGLang names, no nulls, no no-op keys."""
        out = self.model_dump(exclude_none=True, exclude={*_SP_UNSUPPORTED, *_SP_NO_EFFECT})
        if self.sampling_seed is not None:
            out["seed"] = self.sampling_seed
        if isinstance(out.get("json_schema"), dict):
            out["json_schema"] = json.dumps(out["json_schema"])
        return out


class GenerateRequest(BaseModel):
    """POST /generate: a single prompt or a batch, as text or token ids."""

    model_config = STRICT

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    extra_key: str | None = None
    cache_salt: str | None = None  # SGLang's name of the prefix-cache namespace
    context: str | None = None  # a named context (see /contexts) put before each prompt
    log_metrics: bool = True
    # SGLang fields accepted only as null / false.
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    input_embeds: Any = None
    lora_path: str | list[str | None] | None = None
    lora_id: str | list[str | None] | None = None
    session_id: str | None = None
    session_params: dict[str, Any] | None = None
    modalities: list[str] | None = None
    custom_logit_processor: str | list[str | None] | None = None
    token_ids_logprob: list[int] | list[list[int]] | None = None
    return_hidden_states: bool = False

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        _require_null(self, _REQ_UNSUPPORTED, "request")
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' and 'input_ids'")
        if self.extra_key is not None and self.cache_salt is not None:
            raise ValueError("give either 'extra_key' or 'cache_salt', not both")
        return self

    @field_validator("input_ids")
    @classmethod
    def _ids_nonneg(cls, v: Any) -> Any:
        rows = v if v and isinstance(v[0], list) else [v or []]
        if any(t < 0 for row in rows for t in row):
            raise ValueError("token ids must be >= 0")
        return v

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def batch_size(self) -> int:
        if not self.is_batch:
            return 1
        return len(self.text if self.text is not None else self.input_ids)  # type: ignore

    def items(self) -> list[GenerateItem]:
        """Split into per-prompt items; list-valued options must match the batch size."""
        size = self.batch_size()
        if self.is_batch and size == 0:
            raise InvalidRequest("the batch is empty")
        prompts = self.text if self.text is not None else self.input_ids
        prompts = prompts if self.is_batch else [prompts]  # type: ignore[list-item]

        def per_item(name: str, value: Any) -> list[Any]:
            if isinstance(value, list):
                if not self.is_batch:
                    raise InvalidRequest(f"'{name}' is a list but the prompt is not a batch")
                if len(value) != size:
                    raise InvalidRequest(
                        f"'{name}' has {len(value)} entries for a batch of {size}")
                return value
            return [value] * size

        params = per_item("sampling_params", self.sampling_params)
        logprob = per_item("return_logprob", self.return_logprob)
        start = per_item("logprob_start_len", self.logprob_start_len)
        top = per_item("top_logprobs_num", self.top_logprobs_num)
        rids = per_item("rid", self.rid)
        if len(set(r for r in rids if r is not None)) < sum(r is not None for r in rids):
            raise InvalidRequest("'rid' values must be unique within a batch")
        return [
            GenerateItem(
                text=prompt if self.text is not None else None,
                input_ids=prompt if self.input_ids is not None else None,
                sampling_params=(params[i] or SamplingParams()).to_engine(),
                return_logprob=bool(logprob[i]),
                logprob_start_len=start[i],
                top_logprobs_num=top[i],
                return_text_in_logprobs=self.return_text_in_logprobs,
                rid=rids[i],
                extra_key=self.extra_key if self.extra_key is not None else self.cache_salt,
                context=self.context,
            )
            for i, prompt in enumerate(prompts)
        ]


class GenerateItem(BaseModel):
    """One prompt of a request, in the keyword arguments of `Engine.async_generate`."""

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool = False
    rid: str | None = None
    extra_key: str | None = None
    context: str | None = None

    @property
    def n(self) -> int:
        return int(self.sampling_params.get("n", 1))

    def engine_kwargs(self, rid: str, stream: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt": self.text,
            "input_ids": self.input_ids,
            "sampling_params": dict(self.sampling_params),
            "return_logprob": self.return_logprob,
            "logprob_start_len": self.logprob_start_len,
            "top_logprobs_num": self.top_logprobs_num,
            "return_text_in_logprobs": self.return_text_in_logprobs,
            "stream": stream,
            "rid": rid,
        }
        if self.extra_key is not None:
            kwargs["extra_key"] = self.extra_key
        if self.context is not None:
            kwargs["context"] = self.context
        return kwargs


class ContextRequest(BaseModel):
    """POST /contexts: ingest a document as a named context."""

    model_config = STRICT

    name: str
    text: str | None = None
    input_ids: list[int] | None = None
    namespace: str = ""
    pin: bool = False

    @model_validator(mode="after")
    def _check(self) -> ContextRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' and 'input_ids'")
        return self
