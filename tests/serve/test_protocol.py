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
    img = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
    )
    with pytest.raises(ValueError, match="image_url"):
        img.messages[0].text()


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
