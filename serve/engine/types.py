"""Plain data crossing the engine boundary: sampling parameters, requests and incremental outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from serve.structured.spec import OutputConstraint

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class SamplingParams:
    """How to generate. `max_tokens` is already clamped to the context by the caller."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Top-k alternatives to report per generated token; None = no logprobs, 0 = only the chosen token.
    logprobs: int | None = None
    # Same for the prompt tokens (completions with echo=true); the first prompt token has none.
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    # What the output must match (JSON schema, regex, ...); None: free text.
    constraint: OutputConstraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # None: the base model
    # `params.constraint` compiled for this engine's tokenizer (xgrammar), done before submitting so
    # the engine loop never compiles; engines that compile themselves (vLLM) leave it None.
    grammar: object | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationOutput:
    """One incremental update for a request: the tokens and text produced since the last one."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    # Sent once, with the first update, when prompt_logprobs was asked (None for the first token).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    error: str | None = None  # set with finish_reason="error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineOverloadedError(RuntimeError):
    """The engine's queue is full (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped and cannot serve requests (HTTP 503)."""


class UnknownAdapterError(KeyError):
    """The request names an adapter the engine does not hold (HTTP 404)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown adapter {self.name!r}"


class InvalidGenerationRequest(ValueError):
    """The engine cannot take this request as given (HTTP 400 naming `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class GenerationFailedError(RuntimeError):
    """A request ended with finish_reason "error": the engine step running it failed (HTTP 500)."""
