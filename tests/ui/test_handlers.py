"""The page's event handlers driven directly (no browser) against the fake API."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.ui.fake_api import run_fake_api
from ui.handlers import Handlers


@pytest.fixture(scope="module")
def fake():
    with run_fake_api(api_key="secret", delay=0.03) as server:
        yield server


@pytest.fixture
def h(fake, tmp_path):
    return Handlers(fake.base_url, "secret", tmp_path / "feedback")


def collect(agen) -> list:
    async def go():
        return [item async for item in agen]

    return asyncio.run(go())


def chat_turn(h, text, history, meta, model="adapter-a", system="Be brief."):
    msg, history, meta, error, send, stop = h.start_turn(text, history, meta, model, system, 0.2, 0.9, 32)
    assert msg == "" and send["visible"] is False and stop["visible"] is True
    assert history[-1] == {"role": "assistant", "content": ""}
    return collect(h.stream_turn(history, meta))


def test_refresh_models_fills_pickers(h):
    chat, left, right, error = asyncio.run(h.refresh_models(None, None, "slow"))
    assert chat["value"] == "base" and left["value"] == "base"
    assert right["value"] == "slow"  # a still-listed selection is kept
    assert ("adapter-a · adapter of base", "adapter-a") in chat["choices"]
    assert error["visible"] is False


def test_refresh_models_shows_auth_error(fake, tmp_path):
    h = Handlers(fake.base_url, "wrong", tmp_path)
    *pickers, error = asyncio.run(h.refresh_models(None, None, None))
    assert error["visible"] is True and "401" in error["value"] and "API key" in error["value"]


def test_chat_streams_and_keeps_multi_turn_history(h, fake):
    yields = chat_turn(h, "hello", [], [])
    assert len(yields) >= 3  # one update per streamed word
    partial = [y[0][-1]["content"] for y in yields]
    assert partial[0] != partial[-1] and partial[-1] == "[adapter-a] echo: hello"
    history, meta = yields[-1][0], yields[-1][1]

    yields = chat_turn(h, "again", history, meta, model="base")
    assert fake.requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "[adapter-a] echo: hello"},
        {"role": "user", "content": "again"},
    ]
    assert fake.requests[-1]["model"] == "base"
    assert yields[-1][0][-1]["content"] == "[base] echo: again"


def test_api_error_gives_the_prompt_back(h):
    (last,) = chat_turn(h, "hello", [], [], model="no-such-adapter")
    history, meta, msg, error = last
    assert history == [] and meta == [] and msg == "hello"
    assert error["visible"] is True
    assert "404 model_not_found: The model &#x27;no-such-adapter&#x27; does not exist" in error["value"]


def test_error_mid_reply_keeps_what_arrived(h):
    last = chat_turn(h, "hello", [], [], model="midstream")[-1]
    assert last[0][-1]["content"] == "[midstream] echo:"
    assert "error mid-reply: engine failed" in last[3]["value"]


def test_thumbs_write_kto_rows(h, tmp_path):
    history, meta, *_ = chat_turn(h, "hello", [], [])[-1]
    note = h.rate(history, meta, SimpleNamespace(index=1, liked=False))
    assert note.startswith("Disliked reply saved as row 1 of")
    (row,) = [json.loads(x) for x in (tmp_path / "feedback" / "kto.jsonl").read_text().splitlines()]
    assert row["label"] is False and row["model"] == "adapter-a"
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][2]["content"] == "[adapter-a] echo: hello"
    assert h.rate(history, meta, SimpleNamespace(index=0, liked=True)).startswith("Not saved: message 0")


def test_export_tags_each_reply_with_its_model(h):
    history, meta, *_ = chat_turn(h, "one", [], [], model="base")[-1]
    history, meta, *_ = chat_turn(h, "two", history, meta, model="adapter-a")[-1]
    update = h.export(history, meta)
    payload = json.loads(Path(update["value"]).read_text())
    assert payload["models"] == ["adapter-a", "base"]
    assert [m.get("model") for m in payload["messages"]] == [None, "base", None, "adapter-a"]
    assert payload["messages"][3]["sampling"] == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 32}
    assert payload["system"] == "Be brief."


def run_ab(h, left, right):
    out = h.start_ab("hi", left, right, "Sys", 0.0, 1.0, 16)
    left_chat, right_chat, state = out[0], out[1], out[2]
    assert left_chat["label"] == f"Left · {left}" and right_chat["label"] == f"Right · {right}"
    assert out[3]["interactive"] is False
    return state, collect(h.stream_ab(state))


def test_ab_streams_both_sides_and_records_preference(h, tmp_path):
    state, yields = run_ab(h, "base", "adapter-a")
    left, right, left_btn, right_btn, error = yields[-1]
    assert left[-1]["content"] == "[base] echo: hi" and right[-1]["content"] == "[adapter-a] echo: hi"
    assert left_btn["interactive"] is True and error["visible"] is False
    # Both sides grew while the other was still streaming.
    growth = [(len(y[0][-1]["content"]), len(y[1][-1]["content"])) for y in yields[:-1]]
    assert any(0 < a < 15 and 0 < b < 15 for a, b in growth)

    note, *_ = h.prefer("right", left, right, state)
    assert "Right (adapter-a) preferred: saved as row 1" in note
    (row,) = [json.loads(x) for x in (tmp_path / "feedback" / "dpo.jsonl").read_text().splitlines()]
    assert row["conversations"] == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "hi"}]
    assert row["chosen"]["content"] == "[adapter-a] echo: hi" and row["chosen_model"] == "adapter-a"
    assert row["rejected"]["content"] == "[base] echo: hi" and row["rejected_model"] == "base"


def test_ab_error_on_one_side_is_shown(h):
    _, yields = run_ab(h, "nope", "base")
    left, right, left_btn, _, error = yields[-1]
    assert right[-1]["content"] == "[base] echo: hi"
    assert left_btn["interactive"] is False
    assert "Left (nope): 404 model_not_found" in error["value"]


def test_stop_closes_the_stream_on_the_server(h, fake):
    _, history, meta, *_ = h.start_turn("go", [], [], "slow", "", 0.0, 1.0, 256)

    async def stop_after_three():
        agen = h.stream_turn(history, meta)
        for _ in range(3):
            await agen.__anext__()
        await agen.aclose()

    asyncio.run(stop_after_three())
    deadline = time.monotonic() + 5
    while "slow" not in fake.app.state.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "slow" in fake.app.state.cancelled


def test_create_ui_builds_the_page(tmp_path):
    from ui.app import create_ui

    blocks = create_ui("http://127.0.0.1:1", None, tmp_path)
    ids = {c.get("props", {}).get("elem_id") for c in blocks.config["components"]}
    assert {"chatbot", "model", "stop", "ab-left", "ab-right", "left-better", "export"} <= ids


def test_stop_before_any_token_gives_the_text_back(h):
    _, history, meta, *_ = h.start_turn("first", [], [], "base", "", 0.0, 1.0, 8)
    history, meta, msg, send, stop = h.stop_turn(history, meta)
    assert history == [] and meta == [] and msg == "first"
    assert send["visible"] is True and stop["visible"] is False
    partial = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "half"}]
    kept, _, msg, *_ = h.stop_turn(partial, [{}, {"model": "base"}])
    assert kept == partial and msg["__type__"] == "update"


WEATHER = '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]'


def test_json_switch_and_tools_box_reach_the_request_and_calls_show_as_blocks(h, fake):
    msg, history, meta, *_ = h.start_turn("weather?", [], [], "base", "", 0.2, 0.9, 32, True, WEATHER)
    yields = collect(h.stream_turn(history, meta))
    request = fake.requests[-1]
    assert request["response_format"] == {"type": "json_object"}
    assert request["tools"][0]["function"]["name"] == "get_weather"
    history, meta = yields[-1][0], yields[-1][1]
    assert history[-2] == {"role": "assistant", "content": "Checking."}
    block = history[-1]
    assert block["metadata"]["title"] == "Tool call: get_weather"
    assert json.loads(block["content"].removeprefix("```json\n").removesuffix("\n```")) == {"city": "Paris"}
    assert meta[-1]["tool_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # The block is shown, not sent back: the next request has the text reply only.
    collect(h.stream_turn(*h.start_turn("thanks", history, meta, "base", "", 0.2, 0.9, 32)[1:3]))
    assert [m["content"] for m in fake.requests[-1]["messages"]] == ["weather?", "Checking.", "thanks"]
    assert "response_format" not in fake.requests[-1] and "tools" not in fake.requests[-1]


def test_bad_tools_json_is_refused_on_the_page(h):
    import gradio as gr

    with pytest.raises(gr.Error, match="Tools is not valid JSON"):
        h.start_turn("hi", [], [], "base", "", 0.2, 0.9, 32, False, "[{oops")
    with pytest.raises(gr.Error, match="JSON list"):
        h.start_turn("hi", [], [], "base", "", 0.2, 0.9, 32, False, '{"name": "f"}')


def test_a_message_sent_before_the_first_model_list_goes_to_the_model_then_shown(h):
    chat, left, right, error = asyncio.run(h.fill_empty_pickers(None, None, None))
    assert chat["value"] == "base" and right["value"] == "adapter-a" and error["visible"] is False
    import gradio as gr

    # Pickers already set are left alone (the event sends nothing back).
    assert all(u is gr.skip() or u == gr.skip() for u in asyncio.run(h.fill_empty_pickers("a", "b", "c")))


def test_polling_updates_the_pickers_only_when_the_list_changed(h):
    chat, left, right, known = asyncio.run(h.poll_models("adapter-a", None, None, []))
    assert chat["value"] == "adapter-a" and known == ["base", "adapter-a", "midstream", "slow"]
    import gradio as gr

    unchanged = asyncio.run(h.poll_models("adapter-a", "base", "slow", known))
    assert all(u == gr.skip() for u in unchanged)
