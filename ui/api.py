"""The chat page's view of the API: list models, stream a chat, explain errors to a person.

Everything goes through the official `openai` client against `BASE_URL/v1`, so the page shows exactly
what `curl` or any OpenAI client gets. No retries: a 429 is shown, not hidden behind a retry loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai import AsyncOpenAI

NO_KEY = "no-key"  # the openai client insists on a key; servers without --api-key ignore it

_HINTS = {
    401: "Check the API key (`--api-key` / LLM_SERVE_API_KEY) the page was started with.",
    403: "Check the API key the page was started with.",
    404: "Pick a model from the list (↻ refreshes it from /v1/models).",
    413: "Shorten the conversation (Clear) or the system prompt.",
    429: "The server is busy; try again in a moment.",
    503: "The server is starting or shutting down; try again in a moment.",
}


@dataclass(frozen=True)
class Sampling:
    """Sampling settings sent with every chat request."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class ModelEntry:
    """One row of /v1/models: a base model (parent None) or an adapter of `parent`."""

    id: str
    parent: str | None = None

    @property
    def label(self) -> str:
        return f"{self.id} · adapter of {self.parent}" if self.parent else f"{self.id} · base"


@dataclass(frozen=True)
class ToolCallEvent:
    """A tool call the model made (the page shows it as a block; it does not run tools)."""

    name: str
    arguments: str  # JSON text, as the API sends it


def output_options(json_mode: bool, tools: list[dict] | None, tool_choice: str = "auto") -> dict[str, Any]:
    """Request fields for the page's output switches: JSON mode, the tools offered and `tool_choice`
    (`required` makes the model call one, by grammar on llm-serve)."""
    extra: dict[str, Any] = {}
    if json_mode:
        extra["response_format"] = {"type": "json_object"}
    if tools:
        extra["tools"] = tools
        if tool_choice and tool_choice != "auto":
            extra["tool_choice"] = tool_choice
    return extra


def parse_tools(text: str | None) -> list[dict] | None:
    """The Tools box: empty, or a JSON list of OpenAI tools (`{"type": "function", "function": {...}}`)."""
    import json

    if not text or not text.strip():
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Tools is not valid JSON: {exc}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise ValueError('Tools must be a JSON list of {"type": "function", "function": {"name": ..., ...}}')
    return tools


def api_base(base_url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> `http://host:port/v1`."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def make_client(base_url: str, api_key: str | None, timeout: float = 600.0) -> AsyncOpenAI:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=api_base(base_url), api_key=api_key or NO_KEY, max_retries=0, timeout=timeout)


async def list_models(client: AsyncOpenAI) -> list[ModelEntry]:
    """Models the server offers, base models first, then adapters, each group in server order."""
    page = await client.models.list()
    entries = [ModelEntry(id=m.id, parent=getattr(m, "parent", None) or None) for m in page.data]
    return [e for e in entries if e.parent is None] + [e for e in entries if e.parent is not None]


async def stream_chat(
    client: AsyncOpenAI, model: str, messages: list[dict], sampling: Sampling, extra: dict | None = None
) -> AsyncIterator[str | ToolCallEvent]:
    """Yield the reply's text deltas, then its tool calls (assembled from `delta.tool_calls`);
    raises openai errors (including an error sent mid-stream). `extra`: more request fields."""
    stream = await client.chat.completions.create(
        model=model, messages=messages, stream=True, **sampling.as_dict(), **(extra or {})
    )
    calls: dict[int, dict[str, str]] = {}
    try:
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    yield choice.delta.content
                for delta in (choice.delta.tool_calls if choice.delta else None) or []:
                    call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                    if delta.function:
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
        for i in sorted(calls):
            yield ToolCallEvent(calls[i]["name"], calls[i]["arguments"])
    finally:
        # Closing the response tells the server the client left, so it stops generating.
        await stream.close()


def describe_error(exc: BaseException, base_url: str = "") -> str:
    """One paragraph a person can act on: status, code, the server's message and what to try."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"The API at {api_base(base_url)} did not answer in time. Lower max tokens or try again."
    if isinstance(exc, openai.APIConnectionError):
        return f"Cannot reach the API at {api_base(base_url)}. Is the server running?"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or exc.response.text[:300] or exc.message
        code = body.get("code") or body.get("type")
        param = body.get("param")
        parts = [f"{exc.status_code}" + (f" {code}" if code else "") + f": {message}"]
        if param:
            parts.append(f"(parameter: {param})")
        if exc.status_code in _HINTS:
            parts.append(_HINTS[exc.status_code])
        return " ".join(parts)
    if isinstance(exc, openai.APIError):
        # An error chunk inside a stream: the reply so far was kept, the rest failed.
        return f"The server reported an error mid-reply: {exc.message}"
    return f"{type(exc).__name__}: {exc}"
