"""Mount the Gradio chat page (`ui.app.create_ui`) at /ui on the server's own app.

The page talks to this same server over loopback with the OpenAI client, so what it shows is what
`curl` gets (auth, errors and all). The page holds the API key server-side; when the server listens
beyond loopback with `--api-key`, the page asks for a login whose password is that key.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import FastAPI

from serve.config import ServeConfig

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def make_ui_mounter(config: ServeConfig):
    def mount(app: FastAPI) -> None:
        import gradio as gr

        from ui.app import create_ui

        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        key = config.resolved_api_key()
        blocks = create_ui(
            base_url=f"http://{host}:{config.port}", api_key=key, feedback_dir=Path(config.feedback_dir)
        )
        auth = None
        if key and config.host not in LOOPBACK:
            auth = lambda _user, password: hmac.compare_digest(password.encode(), key.encode())  # noqa: E731
        gr.mount_gradio_app(
            app,
            blocks,
            path="/ui",
            auth=auth,
            auth_message="Password: the server's API key" if auth else None,
        )

    return mount
