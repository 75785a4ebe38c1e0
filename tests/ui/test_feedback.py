"""Feedback rows: shapes, dataset_info.json, locking under concurrent writers, LLaMA-Factory reads them."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from ui.feedback import DATASET_INFO, FeedbackError, FeedbackStore

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kto_rows_append_and_declare_dataset(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    first = store.record_kto(CHAT, liked=True, model="base")
    second = store.record_kto(CHAT[1:3], liked=False, model="adapter-a")
    assert (first.row, second.row) == (1, 2)
    assert first.path == tmp_path / "fb" / "kto.jsonl"
    got = rows(first.path)
    assert got[0]["messages"] == CHAT and got[0]["label"] is True and got[0]["model"] == "base"
    assert got[1]["messages"] == CHAT[1:3] and got[1]["label"] is False
    info = json.loads((tmp_path / "fb" / "dataset_info.json").read_text())
    assert info["feedback_kto"]["columns"] == {"messages": "messages", "kto_tag": "label"}
    assert info["feedback_dpo"]["ranking"] is True


def test_dpo_row_shape(tmp_path):
    store = FeedbackStore(tmp_path)
    saved = store.record_dpo(
        CHAT[:4], chosen="Paris.", rejected="Lyon.", chosen_model="adapter-a", rejected_model="base"
    )
    (row,) = rows(saved.path)
    assert row["conversations"] == CHAT[:4]
    assert row["chosen"] == {"role": "assistant", "content": "Paris."}
    assert row["rejected"] == {"role": "assistant", "content": "Lyon."}
    assert (row["chosen_model"], row["rejected_model"]) == ("adapter-a", "base")


def test_dataset_info_keeps_other_entries(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    FeedbackStore(tmp_path).record_kto(CHAT[1:3], liked=True, model="m")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["mine"] == {"file_name": "mine.json"}
    assert info["feedback_kto"] == DATASET_INFO["feedback_kto"]
    assert not list(tmp_path.glob(".dataset_info.*"))  # no temporary file left behind


@pytest.mark.parametrize(
    ("messages", "why"),
    [
        ([{"role": "user", "content": "hi"}], "end with a assistant"),
        ([{"role": "assistant", "content": "x"}], "expected 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "empty"),
    ],
)
def test_kto_refuses_broken_conversations(tmp_path, messages, why):
    with pytest.raises(FeedbackError, match=why):
        FeedbackStore(tmp_path).record_kto(messages, liked=True, model="m")
    assert not (tmp_path / "kto.jsonl").exists()


def test_dpo_refuses_identical_or_empty_replies(tmp_path):
    store = FeedbackStore(tmp_path)
    with pytest.raises(FeedbackError, match="identical"):
        store.record_dpo(CHAT[1:2], chosen="x", rejected="x", chosen_model="a", rejected_model="b")
    with pytest.raises(FeedbackError, match="non-empty"):
        store.record_dpo(CHAT[1:2], chosen="x", rejected="", chosen_model="a", rejected_model="b")
    with pytest.raises(FeedbackError, match="end with a user"):
        store.record_dpo(CHAT[1:3], chosen="x", rejected="y", chosen_model="a", rejected_model="b")


def test_corrupt_dataset_info_is_named(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(FeedbackError, match="dataset_info.json is not valid JSON"):
        FeedbackStore(tmp_path).record_kto(CHAT[1:3], liked=True, model="m")


def _writer(root: str, worker: int, count: int) -> None:
    store = FeedbackStore(root)
    for i in range(count):
        reply = f"worker {worker} reply {i} " + "x" * 2000  # long lines would interleave without the lock
        store.record_kto(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}], liked=True, model="m"
        )


@pytest.mark.slow  # four writer processes
def test_concurrent_writers_do_not_interleave(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    got = rows(tmp_path / "kto.jsonl")
    assert len(got) == 100
    assert len({r["messages"][1]["content"] for r in got}) == 100


@pytest.mark.slow
def test_llamafactory_reads_the_feedback(tmp_path):
    """LLaMA-Factory's own dataset parser and sharegpt converter accept both files as written."""
    from datasets import load_dataset
    from llamafactory.data.converter import SharegptDatasetConverter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    store = FeedbackStore(tmp_path)
    store.record_kto(CHAT, liked=True, model="base")
    store.record_kto(CHAT[1:3], liked=False, model="base")
    store.record_dpo(CHAT[:4], chosen="Paris.", rejected="Lyon.", chosen_model="a", rejected_model="b")

    data_args = DataArguments(dataset_dir=str(tmp_path))
    kto_attr, dpo_attr = get_dataset_list(["feedback_kto", "feedback_dpo"], str(tmp_path))
    out = {}
    for attr in (kto_attr, dpo_attr):
        ds = load_dataset("json", data_files=str(tmp_path / attr.dataset_name), split="train")
        out[attr.dataset_name] = [SharegptDatasetConverter(attr, data_args)(ex) for ex in ds]

    kto = out["kto.jsonl"]
    assert kto[0]["_system"] == "Be brief."
    assert [m["content"] for m in kto[0]["_prompt"]] == ["Hi", "Hello!", "Capital of France?"]
    # LLaMA-Factory puts the KTO reply first when desirable, behind an empty one when not.
    assert kto[0]["_response"][0]["content"] == "Paris."
    assert kto[1]["_response"][1]["content"] == "Hello!"
    (dpo,) = out["dpo.jsonl"]
    assert dpo["_system"] == "Be brief."
    assert [m["content"] for m in dpo["_response"]] == ["Paris.", "Lyon."]
