"""OpenAI-compatible request and response models (pydantic only; no torch, no HTTP), one module per endpoint.

Field order follows the OpenAI API reference. Requests convert themselves into engine
`SamplingParams` with `to_sampling_params()`; constraints live on the fields (and in the OpenAPI
document generated from them) so a bad value is a 400 naming the parameter before anything reaches
the engine.
"""

from serve.protocol.chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    ChatResponseMessage,
    TextPart,
    TopLogprob,
)
from serve.protocol.common import (
    MAX_N,
    MAX_STOP,
    MAX_TOP_LOGPROBS,
    ErrorBody,
    ErrorResponse,
    StreamOptions,
    Usage,
)
from serve.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from serve.protocol.models import HealthStatus, ModelCard, ModelList
from serve.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

__all__ = [
    "MAX_N",
    "MAX_STOP",
    "MAX_TOP_LOGPROBS",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprobToken",
    "ChatLogprobs",
    "ChatMessage",
    "ChatResponseMessage",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ErrorBody",
    "ErrorResponse",
    "HealthStatus",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TextPart",
    "TokenizeRequest",
    "TokenizeResponse",
    "TokenizerInfo",
    "TopLogprob",
    "Usage",
]
