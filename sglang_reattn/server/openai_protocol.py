"""Request bodies of the OpenAI-compatible routes, with SGLang's extensions.

OpenAI's own fields plus the sampling extensions SGLang accepts on the same routes
(top_k, min_p, regex, json_schema, repetition_penalty, ...). Unknown fields are a 400,
fields this server does not implement are accepted only when null.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sglang_reattn.server.protocol import SamplingParams

_MODEL_CONFIG = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _MODEL_CONFIG
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(BaseModel):
    model_config = _MODEL_CONFIG
    name: str = "schema"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _MODEL_CONFIG
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Common(BaseModel):
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    # SGLang extensions
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    rid: str | None = None
    extra_key: str | None = None
    cache_salt: str | None = None
    lora_path: str | None = None
    session_params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_common(self) -> _Common:
        for name in ("logit_bias", "lora_path", "session_params"):
            if getattr(self, name):
                raise ValueError(f"field {name!r} is not supported by this server")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        grammars = [g for g in (self.regex, self.json_schema, self.ebnf,
                                self._format_schema()) if g]
        if len(grammars) > 1:
            raise ValueError("give only one of regex, json_schema, ebnf and response_format")
        return self

    def _format_schema(self) -> str | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return json.dumps({"type": "object"})
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return json.dumps(fmt.json_schema.schema_)

    def sampling_params(self, max_new_tokens: int | None) -> dict[str, Any]:
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            n=self.n if self.n != 1 else None,
            seed=self.seed,
            regex=self.regex,
            ebnf=self.ebnf,
            json_schema=self.json_schema or self._format_schema(),
            skip_special_tokens=self.skip_special_tokens,
            no_stop_trim=self.no_stop_trim,
        )
        return params.to_engine()

    @property
    def namespace(self) -> str | None:
        return self.extra_key if self.extra_key is not None else self.cache_salt

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("field 'suffix' is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt is empty")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = _MODEL_CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _MODEL_CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls:
            raise ValueError("tool calls are not supported by this server")
        return self

    def to_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if not self.messages:
            raise ValueError("messages is empty")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported by this server")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            if not 0 <= self.top_logprobs <= 20:
                raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs a final assistant message")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens
