"""The page's API client against a fake OpenAI-compatible server: models, streaming, errors."""

from __future__ import annotations

import asyncio

import pytest

from tests.ui.fake_api import run_fake_api
from ui.api import Sampling, api_base, describe_error, list_models, make_client, stream_chat


@pytest.fixture(scope="module")
def fake():
    with run_fake_api(api_key="secret") as server:
        yield server


def run(coro):
    return asyncio.run(coro)


async def _models(base_url, key):
    async with make_client(base_url, key) as client:
        return await list_models(client)


async def _chat(base_url, key, model, messages, sampling=Sampling()):
    async with make_client(base_url, key) as client:
        return [d async for d in stream_chat(client, model, messages, sampling)]


async def _error(coro) -> str:
    try:
        await coro
    except Exception as exc:  # the test asserts the message below
        return describe_error(exc, "http://127.0.0.1:1")
    raise AssertionError("no error raised")


def test_api_base_adds_v1_once():
    assert api_base("http://h:1") == "http://h:1/v1"
    assert api_base("http://h:1/v1/") == "http://h:1/v1"


def test_models_list_bases_then_adapters(fake):
    entries = run(_models(fake.base_url, "secret"))
    assert [e.id for e in entries] == ["base", "adapter-a", "midstream", "slow"]
    assert entries[0].parent is None and entries[1].parent == "base"
    assert entries[1].label == "adapter-a · adapter of base"


def test_stream_yields_deltas_and_sends_sampling(fake):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hello there"}]
    deltas = run(_chat(fake.base_url, "secret", "adapter-a", messages, Sampling(0.0, 0.5, 7)))
    assert len(deltas) > 1
    assert "".join(deltas) == "[adapter-a] echo: hello there"
    sent = fake.requests[-1]
    assert sent["messages"] == messages and sent["stream"] is True
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == (0.0, 0.5, 7)


@pytest.mark.parametrize(
    ("key", "model", "expected"),
    [
        ("wrong", "base", "401 invalid_api_key: Incorrect API key provided. Check the API key"),
        ("secret", "nope", "404 model_not_found: The model 'nope' does not exist. (parameter: model) Pick"),
        ("secret", "busy", "429 queue_full: Too many requests waiting; retry later. The server is busy"),
        ("secret", "midstream", "The server reported an error mid-reply: engine failed"),
    ],
)
def test_errors_are_explained(fake, key, model, expected):
    message = run(_error(_chat(fake.base_url, key, model, [{"role": "user", "content": "hi"}])))
    assert message.startswith(expected)


def test_unreachable_server_is_named():
    message = run(_error(_models("http://127.0.0.1:1", None)))
    assert message == "Cannot reach the API at http://127.0.0.1:1/v1. Is the server running?"
