"""Request and response models for tool calling (pydantic only), in the OpenAI API's shapes."""

from __future__ import annotations

import secrets
import string
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: OpenAI's rule for function names.
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOOLS = 128


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoiceValue = Literal["none", "auto", "required"] | NamedToolChoice


def parse_tool_choice(value: Any) -> ToolChoiceValue | None:
    """One error message for every bad shape (a union would report each alternative's complaint)."""
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict):
        try:
            return NamedToolChoice.model_validate(value)
        except ValueError:
            pass
    raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')


#: The request field: validated by `parse_tool_choice`.
ToolChoice = Annotated[Any, AfterValidator(parse_tool_choice)]


class FunctionCall(BaseModel):
    # Past calls come back as the client got them; extra keys it adds are ignored.
    model_config = ConfigDict(strict=True)

    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True)

    id: str = Field(default_factory=lambda: new_call_id())
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


def new_call_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))
