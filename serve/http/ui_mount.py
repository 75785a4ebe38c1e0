"""Mount the Gradio chat page (`ui.app.create_ui`) at /ui on the server's own app.

The page talks to this same server over loopback with the OpenAI client, so what it shows is what
`curl` gets (auth, errors and all).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from serve.config import ServeConfig


def make_ui_mounter(config: ServeConfig):
    def mount(app: FastAPI) -> None:
        import gradio as gr

        from ui.app import create_ui

        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        blocks = create_ui(
            base_url=f"http://{host}:{config.port}",
            api_key=config.resolved_api_key(),
            feedback_dir=Path(config.feedback_dir),
        )
        gr.mount_gradio_app(app, blocks, path="/ui")

    return mount
