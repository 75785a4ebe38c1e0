"""The chat page: layout and event wiring of the Gradio app (logic lives in `ui.handlers`).

    blocks = create_ui("http://127.0.0.1:8000", api_key=None, feedback_dir=Path("feedback"))
    gradio.mount_gradio_app(fastapi_app, blocks, path="/ui")   # what `llm-serve --ui` does
    blocks.launch()                                            # what `llm-ui` does

The page only talks to the OpenAI-compatible API at `base_url`, never to the engine directly. The
model pickers list what `/v1/models` lists: built with `models` when the caller knows them (the
server mounting its own page; else filled at page load), refreshed every `refresh_every` seconds (adapters that
appear in an --adapter-dir or are loaded at runtime show up on their own) and by ↻. A message sent
before the first list arrives goes to the model the picker then shows, never "Pick a model first".
"""

# No `from __future__ import annotations` here: Gradio finds the LikeData parameter of `rate` below
# through its annotation object, which must not be a string naming a function-local import.
from functools import partial
from pathlib import Path

from ui.api import ModelEntry, Sampling, api_base
from ui.handlers import Handlers
from ui.training.handlers import TrainHandlers, TrainOptions
from ui.training.render import CSS as TRAIN_CSS
from ui.training.tab import add_train_tab

EXAMPLES = [
    "你是谁？",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain LoRA fine-tuning in two sentences.",
]

CSS = """
.api-error { background: #fde8e8; border: 1px solid #f05252; color: #771d1d; border-radius: 8px;
             padding: 10px 14px; font-size: 0.95rem; }
#feedback-note, #ab-note { min-height: 1.5em; font-size: 0.9rem; }
footer { display: none !important; }
"""

# System fonts only: the default themes fetch Google Fonts, which an offline page waits on.
FONT = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"]
FONT_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]


def add_output_controls() -> list:
    """The chat's output switches: JSON mode, and tools to offer (their calls show as blocks)."""
    import gradio as gr

    json_out = gr.Checkbox(label="JSON output", value=False, elem_id="json-output")
    with gr.Accordion("Tools (function calling)", open=False, elem_id="tools-box"):
        tools = gr.Textbox(
            label='OpenAI tools: [{"type": "function", "function": {"name", "parameters"}}]',
            lines=4,
            placeholder="Optional JSON; the model's calls show as blocks (the page does not run them)",
            elem_id="tools",
        )
        tool_choice = gr.Radio(
            ["auto", "required", "none"], value="auto", label="Tool choice", elem_id="tool-choice"
        )
    return [json_out, tools, tool_choice]


def create_ui(
    base_url: str,
    api_key: str | None,
    feedback_dir: Path,
    *,
    defaults: Sampling | None = None,
    concurrency_limit: int = 16,
    train: TrainOptions | None = None,
    models: list[ModelEntry] | None = None,
    refresh_every: float = 5.0,
):
    """Build the chat page for the API at `base_url`; feedback goes to `feedback_dir`.

    With `train` (where runs may write and datasets come from) the page gets a Train tab.
    `models` (base models first) fill the pickers from the start; without them the first list
    arrives with the page-load event.

    Returns a `gradio.Blocks` with its queue configured (`concurrency_limit` streams at once per
    event), ready for `gradio.mount_gradio_app` or `.launch()`.
    """
    import gradio as gr

    defaults = defaults or Sampling()
    h = Handlers(base_url, api_key, Path(feedback_dir))
    trainer = TrainHandlers(base_url, api_key, train) if train is not None else None
    models = [e for e in models or [] if e.parent is None] + [e for e in models or [] if e.parent]
    choices = [(e.label, e.id) for e in models]
    first_base = models[0].id if models else None
    first_adapter = next((e.id for e in models if e.parent), first_base)
    theme = gr.themes.Soft(primary_hue="indigo", font=FONT, font_mono=FONT_MONO)
    css = CSS + (TRAIN_CSS if trainer else "")

    with gr.Blocks(title="llm-serve chat", theme=theme, css=css, analytics_enabled=False) as blocks:
        gr.Markdown(
            f"### llm-serve · chat with your models and adapters\n"
            f"API `{api_base(base_url)}` · feedback saved to `{feedback_dir}` "
            f"(`feedback_kto`, `feedback_dpo` in its dataset_info.json)"
        )
        error_box = gr.HTML(visible=False, elem_id="api-error")
        meta = gr.State([])
        ab_state = gr.State({})

        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                model = gr.Dropdown(
                    label="Model or adapter",
                    choices=choices,
                    value=first_base,
                    allow_custom_value=True,
                    elem_id="model",
                )
                refresh = gr.Button("↻ Refresh models", size="sm", elem_id="refresh")
                system = gr.Textbox(label="System prompt", lines=3, placeholder="Optional", elem_id="system")
                temperature = gr.Slider(
                    0, 2, value=defaults.temperature, step=0.05, label="Temperature", elem_id="temperature"
                )
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top p", elem_id="top-p")
                max_tokens = gr.Slider(
                    1, 4096, value=defaults.max_tokens, step=1, label="Max tokens", elem_id="max-tokens"
                )
                output = add_output_controls()

            with gr.Column(scale=3), gr.Tabs() as tabs:
                with gr.Tab("Chat", id="chat"):
                    chatbot = gr.Chatbot(
                        type="messages",
                        allow_tags=False,
                        height=440,
                        label="Chat",
                        elem_id="chatbot",
                        show_copy_button=True,
                        placeholder="Pick a model, type a message. Like/dislike on a reply saves it as KTO data.",
                    )
                    with gr.Row():
                        msg = gr.Textbox(
                            show_label=False,
                            placeholder="Message (Enter sends, Shift+Enter for a new line)",
                            scale=6,
                            elem_id="chat-input",
                        )
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                        stop = gr.Button("Stop", variant="stop", scale=1, visible=False, elem_id="stop")
                    with gr.Row():
                        clear = gr.Button("Clear", size="sm", elem_id="clear")
                        export = gr.Button("Export JSON", size="sm", elem_id="export")
                    export_file = gr.File(label="Conversation JSON", visible=False, elem_id="export-file")
                    feedback_note = gr.Markdown(elem_id="feedback-note")
                    gr.Examples([[e] for e in EXAMPLES], inputs=[msg], label="Example prompts")

                with gr.Tab("A/B compare", id="ab"):
                    with gr.Row():
                        left_model = gr.Dropdown(
                            label="Left",
                            choices=choices,
                            value=first_base,
                            allow_custom_value=True,
                            elem_id="left-model",
                        )
                        right_model = gr.Dropdown(
                            label="Right",
                            choices=choices,
                            value=first_adapter,
                            allow_custom_value=True,
                            elem_id="right-model",
                        )
                    with gr.Row():
                        ab_prompt = gr.Textbox(
                            show_label=False,
                            placeholder="One prompt for both models (uses the system prompt and sampling)",
                            scale=6,
                            elem_id="ab-input",
                        )
                        ab_run = gr.Button("Compare", variant="primary", scale=1, elem_id="ab-run")
                        ab_stop = gr.Button("Stop", variant="stop", scale=1, visible=False, elem_id="ab-stop")
                    with gr.Row(equal_height=True):
                        left_chat = gr.Chatbot(
                            type="messages", allow_tags=False, height=360, label="Left", elem_id="ab-left"
                        )
                        right_chat = gr.Chatbot(
                            type="messages", allow_tags=False, height=360, label="Right", elem_id="ab-right"
                        )
                    with gr.Row():
                        left_better = gr.Button("◀ Left is better", interactive=False, elem_id="left-better")
                        right_better = gr.Button(
                            "Right is better ▶", interactive=False, elem_id="right-better"
                        )
                    ab_note = gr.Markdown(elem_id="ab-note")
                    gr.Examples([[e] for e in EXAMPLES], inputs=[ab_prompt], label="Example prompts")

                if trainer is not None:
                    add_train_tab(blocks, trainer, h, [model, left_model, right_model], error_box, tabs)

        pickers = [model, left_model, right_model]
        known = gr.State([e.id for e in models or []])
        if not models:
            # Built without the list: fetch it now. Built with it, a load-time refresh could land after
            # the user picked another model and put the picker back; the timer below follows changes.
            blocks.load(h.refresh_models, pickers, [*pickers, error_box])
        refresh.click(h.refresh_models, pickers, [*pickers, error_box])
        timer = gr.Timer(refresh_every)
        timer.tick(h.poll_models, [*pickers, known], [*pickers, known], show_progress="hidden")

        sampling = [system, temperature, top_p, max_tokens]
        streams = []
        for trigger in (msg.submit, send.click):
            filled = trigger(h.fill_empty_pickers, pickers, [*pickers, error_box], queue=False)
            started = filled.then(
                h.start_turn,
                [msg, chatbot, meta, model, *sampling, *output],
                [msg, chatbot, meta, error_box, send, stop],
                queue=False,
            )
            streamed = started.success(h.stream_turn, [chatbot, meta], [chatbot, meta, msg, error_box])
            streamed.then(h.end_turn, None, [send, stop], queue=False)
            streams.append(streamed)
        stop.click(
            h.stop_turn, [chatbot, meta], [chatbot, meta, msg, send, stop], cancels=streams, queue=False
        )

        def rate(history: list, meta_: list, like: gr.LikeData) -> str:
            return h.rate(history, meta_, like)

        chatbot.like(rate, [chatbot, meta], [feedback_note])
        clear_outputs = [chatbot, meta, feedback_note, error_box, export_file]
        clear.click(h.clear, None, clear_outputs, queue=False)
        chatbot.clear(h.clear, None, clear_outputs, queue=False)
        export.click(h.export, [chatbot, meta], [export_file])

        ab_streams = []
        for trigger in (ab_prompt.submit, ab_run.click):
            filled = trigger(h.fill_empty_pickers, pickers, [*pickers, error_box], queue=False)
            started = filled.then(
                h.start_ab,
                [ab_prompt, left_model, right_model, *sampling],
                [
                    left_chat,
                    right_chat,
                    ab_state,
                    left_better,
                    right_better,
                    ab_note,
                    error_box,
                    ab_run,
                    ab_stop,
                ],
                queue=False,
            )
            streamed = started.success(
                h.stream_ab, [ab_state], [left_chat, right_chat, left_better, right_better, error_box]
            )
            streamed.then(h.end_ab, None, [ab_run, ab_stop], queue=False)
            ab_streams.append(streamed)
        ab_stop.click(
            h.stop_ab,
            [left_chat, right_chat],
            [left_better, right_better, ab_run, ab_stop],
            cancels=ab_streams,
            queue=False,
        )
        for button, side in ((left_better, "left"), (right_better, "right")):
            button.click(
                partial(h.prefer, side),
                [left_chat, right_chat, ab_state],
                [ab_note, left_better, right_better],
                queue=False,
            )

    blocks.queue(default_concurrency_limit=concurrency_limit)
    return blocks
