"""Chat UI: a Gradio page for chatting with, comparing and rating the models an OpenAI-compatible
server offers; feedback becomes KTO/DPO training data.

`llm-serve --ui` mounts `ui.app.create_ui(...)` at /ui; `llm-ui --base-url URL` runs it standalone.
"""
