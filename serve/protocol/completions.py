"""POST /v1/completions: request and response models (prompts as text or token ids, echo, logprobs)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from serve.engine.types import SamplingParams
from serve.protocol.common import (
    MAX_N,
    MAX_SAFE_INT,
    MAX_TOP_LOGPROBS,
    APIRequest,
    Int,
    Penalty,
    Seed,
    StopField,
    StreamOptions,
    Temperature,
    Text,
    TokenId,
    TopP,
    UnsupportedField,
    Usage,
    normalise_stop,
    request_config,
)
from serve.structured.protocol import ResponseFormat, StructuredOutputs
from serve.structured.spec import OutputConstraint

PromptText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = (
    PromptText
    | Annotated[list[PromptText], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)

# max_tokens=0 scores the prompt only: it needs echo=true and cannot be streamed.
_SCORE_ONLY_NEEDS_ECHO = {
    "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
    "then": {
        "properties": {"echo": {"const": True}, "stream": {"const": False}},
        "required": ["echo"],
    },
}


class CompletionRequest(APIRequest):
    model_config = request_config(json_schema_extra=_SCORE_ONLY_NEEDS_ECHO)

    model: Text | None = None
    prompt: Prompt
    echo: bool = False
    frequency_penalty: Penalty = 0.0
    logprobs: Int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    max_tokens: Int(ge=0, le=MAX_SAFE_INT) | None = 16
    n: Int(ge=1, le=MAX_N) = 1
    presence_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: Text | None = Field(None, json_schema_extra={"maxLength": 0})
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    user: Text | None = None
    ignore_eos: bool = False  # vLLM's extension, as for chat
    # vLLM takes both on completions too.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        return normalise_stop(v)

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _no_tools(self):
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            if (self.model_extra or {}).get(name) is not None:
                raise UnsupportedField(name, f"{name} is only supported on /v1/chat/completions")
        return self

    @model_validator(mode="after")
    def _check_score_only(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only meaningful with echo=true")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens=0 cannot be streamed")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(
        self, max_tokens: int, stop_token_ids: list[int], constraint: OutputConstraint | None = None
    ) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=list(self.stop or []),
            stop_token_ids=list(stop_token_ids),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None,
            ignore_eos=self.ignore_eos,
            constraint=constraint,
        )


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
