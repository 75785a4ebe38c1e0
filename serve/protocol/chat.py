"""POST /v1/chat/completions: request, response and stream-chunk models, in the OpenAI docs' field order."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from serve.engine.types import SamplingParams
from serve.protocol.common import (
    MAX_N,
    MAX_TOP_LOGPROBS,
    APIRequest,
    Int,
    MaxTokens,
    Penalty,
    Seed,
    StopField,
    StreamOptions,
    Temperature,
    Text,
    TopP,
    Usage,
    normalise_stop,
    request_config,
)
from serve.structured.protocol import CHAT_RULES, ResponseFormat, StructuredOutputs
from serve.structured.spec import OutputConstraint
from serve.tools.protocol import MAX_TOOLS, DeltaToolCall, Tool, ToolCall, ToolChoice


class TextPart(BaseModel):
    """A `{"type": "text", "text": ...}` content part, the only kind a text model can take."""

    model_config = request_config()

    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        if isinstance(data, dict) and data.get("type") != "text":
            kind = data.get("type")
            if kind is None:
                raise ValueError('a content part needs "type": "text" and a "text" string')
            raise ValueError(
                f"content part type {kind!r} is not supported; this server takes text parts only"
            )
        return data


class ChatMessage(BaseModel):
    model_config = request_config()

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: Text | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        """Content as plain text (parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# `top_logprobs` > 0 needs `logprobs: true`; said in the schema too, so generated clients and schema
# fuzzers know it.
_TOP_LOGPROBS_NEEDS_LOGPROBS = {
    "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
}


class ChatCompletionRequest(APIRequest):
    model_config = request_config(json_schema_extra={**_TOP_LOGPROBS_NEEDS_LOGPROBS, "allOf": CHAT_RULES})

    messages: list[ChatMessage] = Field(min_length=1)
    model: Text | None = None
    frequency_penalty: Penalty = 0.0
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    n: Int(ge=1, le=MAX_N) = 1
    presence_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    user: Text | None = None
    # vLLM's extension: keep generating past EOS (benchmarks that need exact output lengths).
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extension: constrained output (json, regex, choice, grammar, json_object, structural_tag).
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        return normalise_stop(v)

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

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
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            ignore_eos=self.ignore_eos,
            constraint=constraint,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
