"""Put a finished adapter into the running server, through its API, so the chat and A/B pickers list it.

A server started with `--adapter-dir ROOT` serves every complete adapter below ROOT under its path
relative to ROOT (llm-train renames the finished run into place), so the adapter usually appears in
`GET /v1/models` by itself. Otherwise, or to replace weights served under the same name, the page asks
`POST /v1/load_lora_adapter` (vLLM's shape; the server needs `--allow-runtime-lora`).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from ui.api import api_base


class ServeError(RuntimeError):
    """The server did not take the adapter; the message says why and what to change."""


class RuntimeLoadingOff(ServeError):
    """The server has no runtime loading endpoint, or it is switched off."""


class AdapterPublisher:
    """Loads adapters into the server at `base_url` (the page's API) and waits until it lists them."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        wait_s: float = 10.0,
        poll_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base = api_base(base_url)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.wait_s, self.poll_s = wait_s, poll_s
        self.transport = transport  # tests pass httpx.MockTransport

    def _client(self, timeout: float) -> httpx.Client:
        return httpx.Client(headers=self.headers, timeout=timeout, transport=self.transport)

    def listed(self) -> dict[str, dict]:
        """`/v1/models` as {id: card}."""
        with self._client(30) as client:
            response = client.get(f"{self.base}/models")
        response.raise_for_status()
        return {card["id"]: card for card in response.json().get("data", [])}

    def publish(self, name: str, path: Path, *, replace: bool = False) -> str:
        """Make the server serve `path` as `name`; returns the id it is listed under. Raises ServeError.

        `replace`: `name` was served before with other weights. A server following its adapter directory
        serves the rewritten folder as a new version by itself; others are asked to load it in place.
        """
        try:
            listed = self._wait_listed(name, self.wait_s if not replace else 0)
            if listed and not replace:
                return name
            try:
                self._load(name, path, replace=listed)
            except RuntimeLoadingOff:
                if listed:  # it follows its adapter directory, which now holds the new weights
                    return name
                raise
            if not self._wait_listed(name, self.wait_s):
                raise ServeError(f"the server accepted {name} but does not list it in /v1/models")
        except httpx.HTTPError as exc:
            raise ServeError(f"cannot reach the server at {self.base}: {exc}") from exc
        return name

    def _wait_listed(self, name: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while name not in self.listed():
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)
        return True

    def _load(self, name: str, path: Path, replace: bool) -> None:
        body = {"lora_name": name, "lora_path": str(path)}
        if replace:
            body["load_inplace"] = True
        with self._client(300) as client:
            response = client.post(f"{self.base}/load_lora_adapter", json=body)
        if response.status_code == 200:
            return
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        if response.status_code in (404, 405):
            raise RuntimeLoadingOff(
                "the server does not load adapters at run time: start it with --adapter-dir "
                f"{path.parent} (or --allow-runtime-lora), or restart it with --adapter {name}={path}"
            )
        raise ServeError(f"the server refused {name} ({response.status_code}): {message}")
