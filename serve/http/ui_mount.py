"""Mount the Gradio chat page (`ui.app.create_ui`) at /ui on the server's own app.

The page talks to this same server over loopback with the OpenAI client, so what it shows is what
`curl` gets (auth, errors and all). The page holds the API key server-side, so whenever the server
has `--api-key` the page itself asks for it first (Gradio's login; any user name, the key as the
password) and keeps it in the browser session's cookie: otherwise anyone who reaches the server's
address, a reverse proxy on the same host included, could generate text through the page or its
Gradio API without the key.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import FastAPI

from serve.config import ServeConfig


def make_ui_mounter(config: ServeConfig, models: list[tuple[str, str | None]] = ()):
    """`models`: (id, parent) of what the server will list, so the page's pickers show them from the
    first paint (the page then follows /v1/models on its own)."""

    def mount(app: FastAPI) -> None:
        import gradio as gr

        from ui.api import ModelEntry
        from ui.app import create_ui

        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        key = config.resolved_api_key()
        blocks = create_ui(
            base_url=f"http://{host}:{config.port}",
            api_key=key,
            feedback_dir=Path(config.feedback_dir),
            models=[ModelEntry(id=i, parent=p) for i, p in models],
        )
        auth = None
        if key:
            auth = lambda _user, password: hmac.compare_digest(password.encode(), key.encode())  # noqa: E731
        gr.mount_gradio_app(
            app,
            blocks,
            path="/ui",
            auth=auth,
            auth_message="This server needs its API key: any user name, the key as the password"
            if auth
            else None,
        )

    return mount
