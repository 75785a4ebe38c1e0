"""A small client for any OpenAI-compatible chat endpoint, made for bulk data generation.

    client = ChatClient(ClientConfig(base_url="http://127.0.0.1:8000/v1"))
    reply = client.chat([{"role": "user", "content": "..."}], max_tokens=512, json_mode=True)
    data = parse_json_reply(reply.text)      # tolerant: code fences, prose around the JSON, trailing commas

Retries 429, 5xx and connection errors with exponential back-off (honouring `Retry-After`), asks for
the reply's JSON schema (`response_format: json_schema`, strict) when the caller gives one, else JSON
mode (`json_object`), and steps down (schema, then JSON mode, then plain text) for the rest of the run
when the server rejects one; counts requests, retries and tokens (from the server's `usage`) across
threads.
Used by `llm-data synth` and `llm-data extract-role --llm`; safe to share between worker threads.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Literal

from pydantic import BaseModel, Field

from serve.cli_runner import UserError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(UserError, RuntimeError):
    """The endpoint failed in a way retrying does not fix, or retries ran out."""


class ReplyParseError(ValueError):
    """A reply holds no JSON value that can be read."""


class ClientConfig(BaseModel):
    """Where and how to reach the OpenAI-compatible endpoint."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="Endpoint root, ending in /v1")
    api_key: str | None = Field(None, description="Bearer token, if the server wants one")
    model: str | None = Field(None, description="Model id for requests; None: the first of GET /models")
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout (CPU generation is slow)")
    max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/connection errors")
    backoff_s: float = Field(1.0, ge=0, description="First back-off delay; doubles each retry")
    backoff_max_s: float = Field(30.0, ge=0, description="Largest single back-off delay")
    response_format: Literal["json_schema", "json_object", "text"] = Field(
        "json_schema",
        description="How to ask for JSON: the reply's schema (constrained decoding on llm-serve and vLLM), "
        "JSON mode, or plain text; a server that refuses one gets the next",
    )


@dataclass
class Usage:
    """Token and request accounting, summed over threads."""

    requests: int = 0
    retries: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replies_without_usage: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass(frozen=True)
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class ChatClient:
    """Blocking chat-completions client with retries; one instance serves all worker threads."""

    def __init__(self, config: ClientConfig, transport=None):
        import httpx

        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = httpx.Client(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            timeout=config.timeout_s,
            transport=transport,
        )
        self.usage = Usage()
        # What the server refused, learnt from the first 400 (a refused mode is not asked for again).
        self.refused: set[str] = set()
        self._model = config.model
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    @property
    def model(self) -> str:
        """The model id requests use; asks `GET /models` once when none was given."""
        with self._lock:
            if self._model is None:
                data = self._request("GET", "/models").get("data") or []
                if not data:
                    raise EndpointError(f"{self.config.base_url}/models lists no model; pass --model")
                self._model = str(data[0]["id"])
            return self._model

    def check(self) -> list[str]:
        """Fail fast when the endpoint is unreachable; returns the listed model ids."""
        return [str(m.get("id")) for m in self._request("GET", "/models").get("data") or []]

    def chat(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float = 0.7,
        json_mode: bool = True,
        json_schema: dict | None = None,
        seed: int | None = None,
    ) -> ChatReply:
        """One chat request. `json_schema` (`{"name", "schema"}`) asks for a reply of that schema."""
        body: dict = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        for mode in self._modes(json_mode, json_schema):
            if mode == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {**json_schema, "strict": True},
                }
            elif mode == "json_object":
                body["response_format"] = {"type": "json_object"}
            else:
                body.pop("response_format", None)
            try:
                data = self._request("POST", "/chat/completions", body)
                break
            except _BadRequest as e:
                if mode == "text" or ("response_format" not in e.message and "json" not in e.message.lower()):
                    raise EndpointError(f"the endpoint refused the request: {e.message}") from None
                with self._lock:
                    self.refused.add(mode)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"reply has no choices[0].message.content: {str(data)[:300]}") from None
        usage = data.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.usage.add(
            prompt_tokens=prompt, completion_tokens=completion, replies_without_usage=0 if usage else 1
        )
        return ChatReply(text, prompt, completion, choice.get("finish_reason"))

    def _modes(self, json_mode: bool, json_schema: dict | None) -> list[str]:
        """Response formats to try, best first, skipping what the server refused before."""
        order = ["json_schema", "json_object", "text"]
        modes = order[order.index(self.config.response_format) :]
        if json_schema is None:
            modes = [m for m in modes if m != "json_schema"]
        if not json_mode:
            modes = ["text"]
        return [m for m in modes if m not in self.refused] or ["text"]

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        cfg = self.config
        last = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                self.usage.add(retries=1)
            self.usage.add(requests=1)
            retry_after = None
            try:
                r = self._http.request(method, path, json=body)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    try:
                        return r.json()
                    except ValueError:
                        last = f"HTTP {r.status_code} with a body that is not JSON: {r.text[:200]!r}"
                elif r.status_code in RETRY_STATUS:
                    last = f"HTTP {r.status_code}: {_error_message(r)}"
                    retry_after = _retry_after(r)
                elif r.status_code in (400, 422):
                    raise _BadRequest(_error_message(r))
                else:
                    self.usage.add(failed_requests=1)
                    raise EndpointError(
                        f"{method} {cfg.base_url}{path} answered HTTP {r.status_code}: {_error_message(r)}"
                    )
            if attempt < cfg.max_retries:
                delay = min(cfg.backoff_max_s, cfg.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                time.sleep(max(delay, retry_after or 0))
        self.usage.add(failed_requests=1)
        raise EndpointError(
            f"{method} {cfg.base_url}{path} failed after {cfg.max_retries + 1} attempts: {last}"
        )


class _BadRequest(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _error_message(r) -> str:
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return r.text[:300]


def _retry_after(r) -> float | None:
    try:
        return min(60.0, float(r.headers.get("retry-after", "")))
    except ValueError:
        return None


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_SMART_QUOTES = str.maketrans({"“": '"', "”": '"'})


def parse_json_reply(text: str):
    """The first JSON object or array in a model reply.

    Tolerates code fences, prose before and after, trailing commas, and a reply cut off by
    max_tokens after at least one complete element of a top-level array (the complete ones are kept).
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        for fixed in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
            value = _first_json(fixed)
            if value is not None:
                return value
    # Full-width quotes used as JSON quotes: only as a last resort, they are common inside strings.
    value = _first_json(_TRAILING_COMMA.sub(r"\1", text.translate(_SMART_QUOTES)))
    if value is not None:
        return value
    raise ReplyParseError(f"no JSON object or array in the reply: {text[:120]!r}")


def _first_json(text: str):
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch not in "{[":
            continue
        try:
            value, _ = decoder.raw_decode(text, i)
        except ValueError:
            if ch == "[":
                partial = _complete_prefix_of_array(text, i)
                if partial:
                    return partial
            continue
        if isinstance(value, (dict, list)):
            return value
    return None


def _complete_prefix_of_array(text: str, start: int) -> list | None:
    """Elements of a truncated array `[a, b, c...` that decode completely (a and b)."""
    decoder = json.JSONDecoder()
    items, pos = [], start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return items or None
        items.append(value)
