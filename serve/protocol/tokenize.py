"""POST /tokenize, POST /detokenize (vLLM's shapes): request and response models."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from serve.protocol.chat import ChatMessage
from serve.protocol.common import APIRequest, Text, TokenId, request_config

# Exactly one of `prompt` and `messages`, neither of them null.
_ONE_INPUT = {
    "oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
    ]
}


class TokenizeRequest(APIRequest):
    model_config = request_config(json_schema_extra=_ONE_INPUT)

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    # With `messages`: end the rendered text with the assistant prompt, as a chat request does.
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(APIRequest):
    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    model_max_length: int
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    vocab_size: int
