"""What the chat page does on each event: fill the model pickers, stream replies, rate, compare, export.

`Handlers` holds the API address, key and feedback store; `ui.app` wires its methods to the Gradio
components. Streaming handlers are async generators: when the page's Stop button cancels them, the
`finally` blocks close the HTTP streams so the server stops generating for a reader who left.
"""

from __future__ import annotations

import asyncio
import html
from pathlib import Path
from typing import Any

from ui.api import (
    Sampling,
    ToolCallEvent,
    api_base,
    describe_error,
    list_models,
    make_client,
    output_options,
    parse_tools,
    stream_chat,
)
from ui.conversation import (
    export_payload,
    plain,
    rated_messages,
    request_messages,
    text_of,
    tool_call_message,
    with_system,
    write_export,
)
from ui.feedback import FeedbackError, FeedbackStore

SIDES = ("left", "right")


def error_update(message: str | None) -> Any:
    """The error banner: shown with `message`, hidden when None."""
    import gradio as gr

    if not message:
        return gr.update(value="", visible=False)
    lines = "<br>".join(html.escape(line) for line in message.splitlines())
    return gr.update(
        value=f'<div class="api-error" role="alert"><b>API error</b> · {lines}</div>', visible=True
    )


def picker_updates(entries: list, chat_model: str | None, left_model: str | None, right_model: str | None):
    """The three pickers for `entries` (base models first): selections that still exist stay; the
    chat and left pickers default to the first base model, the right one to the first adapter."""
    import gradio as gr

    ids = [e.id for e in entries]
    choices = [(e.label, e.id) for e in entries]
    base = entries[0].id
    adapter = next((e.id for e in entries if e.parent), base)

    def pick(current: str | None, fallback: str) -> Any:
        return gr.update(choices=choices, value=current if current in ids else fallback)

    return pick(chat_model, base), pick(left_model, base), pick(right_model, adapter)


def _last_reply(chat: list[dict] | None) -> str:
    replies = [text_of(m) for m in chat or [] if m.get("role") == "assistant"]
    return replies[-1] if replies else ""


def _running(running: bool) -> tuple[Any, Any]:
    """(start button, stop button) while a stream runs or after it ends."""
    import gradio as gr

    return gr.update(visible=not running), gr.update(visible=running)


def _add_tool_call(history: list[dict], meta: list, reply: int, call: ToolCallEvent, model: str):
    """Show a tool call as a block after the reply (in place of the reply when it has no text)."""
    block = tool_call_message(call.name, call.arguments)
    info = {"model": model, "tool_call": {"name": call.name, "arguments": call.arguments}}
    if history[reply]["content"] == "" and reply == len(history) - 1:
        return history[:reply] + [block], meta[:reply] + [{**meta[reply], **info}]
    return history + [block], meta + [info]


class Handlers:
    """Event handlers of one chat page, bound to one API and one feedback folder."""

    def __init__(self, base_url: str, api_key: str | None, feedback_dir: Path):
        self.base_url = base_url
        self.api_key = api_key
        self.store = FeedbackStore(feedback_dir)

    def _client(self):
        return make_client(self.base_url, self.api_key)

    # --- models -------------------------------------------------------------------------------
    async def refresh_models(self, chat_model: str | None, left_model: str | None, right_model: str | None):
        """Fill the three pickers from /v1/models, keeping selections that still exist."""
        import gradio as gr
        import openai

        try:
            async with self._client() as client:
                entries = await list_models(client)
        except openai.OpenAIError as exc:
            return gr.update(), gr.update(), gr.update(), error_update(describe_error(exc, self.base_url))
        if not entries:
            return gr.update(), gr.update(), gr.update(), error_update("The server lists no models.")
        return (*picker_updates(entries, chat_model, left_model, right_model), error_update(None))

    async def fill_empty_pickers(self, chat_model, left_model, right_model):
        """Before a message or comparison is sent: a picker still empty (the page's first model list
        has not arrived yet) gets the model `refresh_models` would show, so what is sent is what is shown."""
        import gradio as gr

        if chat_model and left_model and right_model:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return await self.refresh_models(chat_model, left_model, right_model)

    async def poll_models(self, chat_model, left_model, right_model, known: list | None):
        """Every few seconds: follow adapters that appear or go on the server; touches the pickers only
        when the list changed (an open dropdown stays open) and never shows an error (a missed poll is
        retried by the next)."""
        import gradio as gr
        import openai

        skip = (gr.skip(), gr.skip(), gr.skip(), gr.skip())
        try:
            async with self._client() as client:
                entries = await list_models(client)
        except openai.OpenAIError:
            return skip
        ids = [e.id for e in entries]
        if not entries or ids == known:
            return skip
        return (*picker_updates(entries, chat_model, left_model, right_model), ids)

    # --- chat ---------------------------------------------------------------------------------
    def start_turn(
        self,
        text,
        history,
        meta,
        model,
        system,
        temperature,
        top_p,
        max_tokens,
        json_mode=False,
        tools="",
        tool_choice="auto",
    ):
        """Append the user's message and an empty reply that `stream_turn` fills. `json_mode`, `tools`
        (the Tools box's JSON) and `tool_choice` are the page's output switches."""
        import gradio as gr

        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a message first.")
        if not model:
            raise gr.Error("Pick a model first (↻ refreshes the list).")
        try:
            extra = output_options(bool(json_mode), parse_tools(tools), tool_choice)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        history = plain(history or [])
        meta = (list(meta or []) + [{}] * len(history))[: len(history)]
        sampling = Sampling(float(temperature), float(top_p), int(max_tokens))
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        meta += [
            {},
            {"model": model, "system": system or "", "sampling": sampling.as_dict(), "output": extra},
        ]
        return ("", history, meta, error_update(None), *_running(True))

    async def stream_turn(self, history, meta):
        """Stream the reply into the last message; on an API error restore the prompt and say why."""
        import gradio as gr
        import openai

        history = plain(history or [])
        if len(history) < 2 or history[-1] != {"role": "assistant", "content": ""}:
            return
        info = meta[-1]
        messages = request_messages(history[:-1], info["system"])
        extra = info.get("output") or {}
        reply = len(history) - 1
        try:
            async with self._client() as client:
                async for event in stream_chat(
                    client, info["model"], messages, Sampling(**info["sampling"]), extra
                ):
                    if isinstance(event, ToolCallEvent):
                        history, meta = _add_tool_call(history, meta, reply, event, info["model"])
                    else:
                        history[reply] = {"role": "assistant", "content": history[reply]["content"] + event}
                    yield list(history), meta, gr.update(), gr.update()
        except openai.OpenAIError as exc:
            error = error_update(describe_error(exc, self.base_url))
            if history[-1]["content"]:
                yield history, meta, gr.update(), error
            else:  # nothing came back: take the turn out and give the text back to edit or resend
                yield history[:-2], meta[:-2], history[-2]["content"], error

    def end_turn(self):
        return _running(False)

    def stop_turn(self, history, meta):
        """After Stop: keep a partial reply; if none arrived, take the turn out and give the text back."""
        import gradio as gr

        history = plain(history or [])
        if len(history) >= 2 and history[-1] == {"role": "assistant", "content": ""}:
            return (history[:-2], list(meta or [])[:-2], history[-2]["content"], *_running(False))
        return (history, meta, gr.update(), *_running(False))

    def rate(self, history, meta, like: Any):
        """Thumbs up/down on a reply -> one KTO row (`like` is Gradio's LikeData)."""
        if like.liked not in (True, False):
            return "Rating cleared in the page; rows already saved stay in the dataset."
        index = like.index[0] if isinstance(like.index, (list, tuple)) else like.index
        history = plain(history or [])
        meta = list(meta or [])
        try:
            messages = rated_messages(history, meta, int(index))
            model = meta[index].get("model", "") if index < len(meta) else ""
            saved = self.store.record_kto(messages, liked=like.liked, model=model)
        except (FeedbackError, ValueError) as exc:
            return f"Not saved: {exc}"
        verdict = "Liked" if like.liked else "Disliked"
        return f"{verdict} reply saved as row {saved.row} of `{saved.path}` (dataset `{saved.dataset}`)."

    def clear(self):
        import gradio as gr

        return [], [], "", error_update(None), gr.update(value=None, visible=False)

    def export(self, history, meta):
        """Write the conversation as JSON and offer it for download."""
        import gradio as gr

        history = plain(history or [])
        if not history:
            raise gr.Error("Nothing to export yet.")
        path = write_export(export_payload(history, list(meta or []), api_base(self.base_url)))
        return gr.update(value=str(path), visible=True)

    # --- A/B ----------------------------------------------------------------------------------
    def start_ab(self, prompt, left_model, right_model, system, temperature, top_p, max_tokens):
        """Show the prompt on both sides and remember what the pair is being asked."""
        import gradio as gr

        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Type a prompt first.")
        if not left_model or not right_model:
            raise gr.Error("Pick a model for both sides.")
        sampling = Sampling(float(temperature), float(top_p), int(max_tokens))
        state = {
            "prompt": prompt,
            "system": system or "",
            "left": left_model,
            "right": right_model,
            "sampling": sampling.as_dict(),
        }
        pair = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        off = gr.update(interactive=False)
        return (
            gr.update(value=pair, label=f"Left · {left_model}"),
            gr.update(value=list(pair), label=f"Right · {right_model}"),
            state,
            off,
            off,
            "",
            error_update(None),
            *_running(True),
        )

    async def stream_ab(self, state):
        """Stream both models' replies side by side, as their tokens arrive."""
        import gradio as gr
        import openai

        if not state:
            return
        messages = with_system(state["system"], [{"role": "user", "content": state["prompt"]}])
        sampling = Sampling(**state["sampling"])
        texts = dict.fromkeys(SIDES, "")
        errors: dict[str, str] = {}
        events: asyncio.Queue = asyncio.Queue()

        def view(done: bool):
            chats = [
                [{"role": "user", "content": state["prompt"]}, {"role": "assistant", "content": texts[s]}]
                for s in SIDES
            ]
            ready = done and not errors and all(texts.values())
            message = "\n".join(f"{s.title()} ({state[s]}): {errors[s]}" for s in SIDES if s in errors)
            buttons = gr.update(interactive=ready) if done else gr.update()
            return (*chats, buttons, buttons, error_update(message) if done else gr.update())

        async def pump(client, side: str) -> None:
            try:
                async for delta in stream_chat(client, state[side], messages, sampling):
                    await events.put((side, delta))
            except openai.OpenAIError as exc:
                errors[side] = describe_error(exc, self.base_url)
            finally:
                await events.put((side, None))

        async with self._client() as client:
            tasks = [asyncio.create_task(pump(client, side)) for side in SIDES]
            try:
                running = len(tasks)
                while running:
                    side, delta = await events.get()
                    if delta is None:
                        running -= 1
                        continue
                    texts[side] += delta
                    yield view(done=False)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        yield view(done=True)

    def stop_ab(self, left_chat, right_chat):
        """After Stop, the partial replies can still be compared."""
        import gradio as gr

        ready = gr.update(interactive=bool(_last_reply(left_chat) and _last_reply(right_chat)))
        return (ready, ready, *_running(False))

    def end_ab(self):
        return _running(False)

    def prefer(self, winner: str, left_chat, right_chat, state):
        """'Left/right is better' -> one DPO row; the buttons lock until the next comparison."""
        import gradio as gr

        if not state:
            return "Run a comparison first.", gr.update(), gr.update()
        replies = {"left": _last_reply(left_chat), "right": _last_reply(right_chat)}
        loser = "right" if winner == "left" else "left"
        conversation = with_system(state["system"], [{"role": "user", "content": state["prompt"]}])
        try:
            saved = self.store.record_dpo(
                conversation,
                chosen=replies[winner],
                rejected=replies[loser],
                chosen_model=state[winner],
                rejected_model=state[loser],
            )
        except FeedbackError as exc:
            return f"Not saved: {exc}", gr.update(), gr.update()
        off = gr.update(interactive=False)
        note = (
            f"{winner.title()} ({state[winner]}) preferred: saved as row {saved.row} of `{saved.path}` "
            f"(dataset `{saved.dataset}`)."
        )
        return note, off, off
