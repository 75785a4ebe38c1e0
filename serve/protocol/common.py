"""Field types and pieces shared by every endpoint's request and response models.

Every request field is validated to what the engine can take, so a bad value is a 400 naming the
parameter before anything reaches the tokenizer or the engine: strings must be valid Unicode (JSON
lets a client send a lone surrogate such as "\\ud800", which no tokenizer can encode), integers stay
within int64, token ids within the vocabulary (checked by the route, which knows the tokenizer).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

#: The largest integer every JSON parser keeps exactly (JavaScript's Number.MAX_SAFE_INTEGER); integers
#: such as seeds are bounded by it rather than by int64, whose maximum a float-based parser rounds up.
MAX_SAFE_INT = 2**53 - 1
MAX_N = 8
MAX_STOP = 8
MAX_TOP_LOGPROBS = 20


def check_unicode(value: str) -> str:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"is not valid Unicode: lone surrogate {value[exc.start]!r} at character {exc.start}; "
            "send UTF-8 text"
        ) from None
    return value


def integral(value):
    """JSON Schema counts 2.0 as an integer: take it as 2 (strict mode refuses strings and 2.5)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(**bounds):  # noqa: N802 - used like a type: `n: Int(ge=1, le=8) = 1`
    """An integer field within `bounds`: strict (no "2" strings, no booleans), 2.0 accepted as 2.

    The bounds come before the validator, so the OpenAPI document states them as minimum/maximum.
    """
    return Annotated[int, Field(**bounds), BeforeValidator(integral)]


#: A string that the tokenizer can encode.
Text = Annotated[str, AfterValidator(check_unicode)]
#: A non-empty stop sequence.
StopString = Annotated[Text, Field(min_length=1)]
#: A token id; its upper bound is the served tokenizer's vocabulary, checked by the route and
#: written into the OpenAPI document once the tokenizer is loaded (`x-token-id`).
TokenId = Annotated[Int(ge=0, le=2**31 - 1), Field(json_schema_extra={"x-token-id": True})]
#: Seeds are what `torch.Generator.manual_seed` and vLLM take without wrapping.
Seed = Int(ge=0, le=MAX_SAFE_INT)
#: Sampling floats: NaN and infinities are refused by the bounds and `allow_inf_nan=False`.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
MaxTokens = Int(ge=1, le=MAX_SAFE_INT)
StopField = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None


def request_config(**extra) -> ConfigDict:
    """Request models: unknown fields are accepted and ignored, as OpenAI-compatible servers do
    (clients send extras); known fields are strict, so `"n": "2"` or `"stream": 0` is the 400 the
    OpenAPI document promises, not a silent conversion."""
    return ConfigDict(extra="allow", strict=True, **extra)


# Fields of OpenAI's or vLLM's APIs that would change the output and that this server does not
# implement: refused with a 400 naming them (unless sent with their no-op value), never ignored.
UNSUPPORTED_FIELDS: dict[str, tuple[tuple, str]] = {
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "top_k": ((None, 0, -1), "top_k is not supported; use top_p"),
    "min_p": ((None, 0, 0.0), "min_p is not supported; use top_p"),
    "repetition_penalty": ((None, 1, 1.0), "repetition_penalty is not supported; use frequency_penalty"),
    "min_tokens": ((None, 0), "min_tokens is not supported"),
    "best_of": ((None, 1), "best_of is not supported; use n"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "allowed_token_ids": ((None,), "allowed_token_ids is not supported; use structured_outputs"),
    "bad_words": ((None, []), "bad_words is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "functions": ((None,), "functions is the deprecated form of tools; send tools"),
    "function_call": ((None,), "function_call is the deprecated form of tool_choice; send tool_choice"),
    "guided_json": ((None,), "guided_json was replaced by structured_outputs.json (vLLM >= 0.11)"),
    "guided_regex": ((None,), "guided_regex was replaced by structured_outputs.regex"),
    "guided_choice": ((None,), "guided_choice was replaced by structured_outputs.choice"),
    "guided_grammar": ((None,), "guided_grammar was replaced by structured_outputs.grammar"),
    "chat_template": ((None,), "chat_template is not supported: each model is served with its own template"),
    "continue_final_message": ((None, False), "continue_final_message is not supported"),
    "add_generation_prompt": ((None, True), "add_generation_prompt=false is not supported"),
}


class UnsupportedField(ValueError):
    """A request field this server does not implement and cannot ignore (`param` names it)."""

    def __init__(self, name: str, reason: str):
        super().__init__(reason)
        self.param = name


class APIRequest(BaseModel):
    model_config = request_config()

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_FIELDS:
                harmless, reason = UNSUPPORTED_FIELDS[name]
                if value not in harmless:
                    raise UnsupportedField(name, reason)
        return self


class StreamOptions(BaseModel):
    model_config = request_config()

    include_usage: bool = False


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: the body of every 4xx/5xx answer (`serve.errors` builds it)."""

    error: ErrorBody


def normalise_stop(v: str | list[str] | None) -> list[str] | None:
    if v is None:
        return None
    return [v] if isinstance(v, str) else list(v)
