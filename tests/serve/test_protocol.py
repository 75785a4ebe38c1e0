"""Protocol validation: what a request may contain and how it becomes sampling parameters."""

import pytest
from pydantic import ValidationError

from serve.protocol import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def test_chat_defaults_and_sampling_params():
    req = ChatCompletionRequest(
        model="m", messages=MSG, temperature=0, stop="END", seed=3, max_completion_tokens=7
    )
    params = req.to_sampling_params(max_tokens=7, stop_token_ids=[2])
    assert params.greedy and params.stop == ["END"] and params.stop_token_ids == [2] and params.seed == 3
    assert req.requested_max_tokens() == 7
    assert params.logprobs is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("top_p", 0),
        ("n", 0),
        ("n", 99),
        ("max_tokens", 0),
        ("presence_penalty", 3),
        ("top_logprobs", 21),
    ],
)
def test_chat_rejects_out_of_range(field, value):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(messages=MSG, **{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_chat_rejects_bad_messages_and_stop():
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=MSG, stop=[""])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=MSG, stop=[str(i) for i in range(9)])
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs"):
        ChatCompletionRequest(messages=MSG, top_logprobs=3)


def test_chat_message_text_parts():
    req = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert req.messages[0].text() == "ab"
    # Non-text parts are refused when the request is validated (a 400 naming the part), not later.
    with pytest.raises(ValueError, match="image_url"):
        ChatCompletionRequest(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
        )


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("abc", ["abc"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [3]], [[1, 2], [3]])],
)
def test_completion_prompt_shapes(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


def test_completion_echo_logprobs_become_prompt_logprobs():
    req = CompletionRequest(prompt=[1, 2], echo=True, logprobs=1, max_tokens=1, temperature=0)
    params = req.to_sampling_params(1, [2])
    assert params.prompt_logprobs == 1 and params.logprobs == 1
    assert CompletionRequest(prompt="x", logprobs=2).to_sampling_params(1, []).prompt_logprobs is None


def test_completion_rejects_empty_and_suffix():
    with pytest.raises(ValidationError):
        CompletionRequest(prompt=[])
    with pytest.raises(ValidationError):
        CompletionRequest(prompt=[[1], []])
    with pytest.raises(ValidationError, match="suffix"):
        CompletionRequest(prompt="x", suffix="y")
    with pytest.raises(ValidationError, match="echo"):
        CompletionRequest(prompt="x", max_tokens=0)


def test_ignore_eos_extension_reaches_sampling_params():
    assert ChatCompletionRequest(messages=MSG, ignore_eos=True).to_sampling_params(4, [2]).ignore_eos
    assert CompletionRequest(prompt="x", ignore_eos=True).to_sampling_params(4, [2]).ignore_eos
    assert not ChatCompletionRequest(messages=MSG).to_sampling_params(4, [2]).ignore_eos


LONE = "\ud800"


@pytest.mark.parametrize(
    ("model", "payload", "loc"),
    [
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": LONE}]}, ("messages", 0, "content")),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
         ("messages", 0, "content", 0, "text")),
        (ChatCompletionRequest, {"messages": MSG, "model": LONE}, ("model",)),
        (ChatCompletionRequest, {"messages": MSG, "stop": [LONE]}, ("stop",)),
        (ChatCompletionRequest, {"messages": MSG, "user": LONE}, ("user",)),
        (CompletionRequest, {"prompt": LONE}, ("prompt",)),
        (CompletionRequest, {"prompt": "x", "stop": LONE}, ("stop",)),
    ],
)  # fmt: skip
def test_strings_must_be_valid_unicode(model, payload, loc):
    with pytest.raises(ValidationError) as info:
        model(**payload)
    errors = [e for e in info.value.errors() if "Unicode" in e["msg"]]
    assert errors, info.value.errors()
    assert [p for p in errors[0]["loc"] if "[" not in str(p) and p not in ("str", "list")][
        : len(loc)
    ] == list(loc)


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", -1), ("seed", 2**53), ("seed", 2**70), ("max_tokens", 2**63), ("n", "2"), ("n", True), ("temperature", float("nan")),
     ("top_p", float("inf")), ("frequency_penalty", float("-inf"))],
)  # fmt: skip
def test_numbers_beyond_what_the_engine_takes_are_refused(field, value):
    for model, base in ((ChatCompletionRequest, {"messages": MSG}), (CompletionRequest, {"prompt": "x"})):
        with pytest.raises(ValidationError) as info:
            model(**base, **{field: value})
        assert info.value.errors()[0]["loc"][0] == field


def test_seed_bounds_are_accepted():
    assert ChatCompletionRequest(messages=MSG, seed=0).seed == 0
    assert ChatCompletionRequest(messages=MSG, seed=2**53 - 1).seed == 2**53 - 1


@pytest.mark.parametrize("content", [[{}], [{"text": "x"}], [{"type": "image_url"}], [{"type": "text"}]])
def test_malformed_content_parts_are_refused(content):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "tool", "content": content}])


def test_tokenize_needs_exactly_one_non_empty_input():
    from serve.protocol import TokenizeRequest

    for bad in ({}, {"messages": []}, {"prompt": "x", "messages": MSG}):
        with pytest.raises(ValidationError):
            TokenizeRequest(**bad)
    assert TokenizeRequest(messages=MSG, add_generation_prompt=False).add_generation_prompt is False


def test_schema_states_cross_field_rules():
    chat = ChatCompletionRequest.model_json_schema()
    assert chat["then"]["properties"]["logprobs"] == {"const": True}
    comp = CompletionRequest.model_json_schema()
    assert comp["if"]["properties"]["max_tokens"] == {"const": 0}
    assert comp["properties"]["suffix"]["maxLength"] == 0
    with pytest.raises(ValidationError, match="cannot be streamed"):
        CompletionRequest(prompt="x", max_tokens=0, echo=True, stream=True)


def test_schema_states_every_bound_as_json_schema():
    """Bounds appear as minimum/maximum (pydantic leaves raw `ge`/`le` keys when a validator wraps them)."""
    import json

    from serve.protocol import DetokenizeRequest, TokenizeRequest

    for model in (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest):
        text = json.dumps(model.model_json_schema())
        assert not any(f'"{k}":' in text for k in ("ge", "le", "gt", "lt")), model.__name__
    assert ChatCompletionRequest.model_json_schema()["properties"]["n"]["maximum"] == 8
