"""Reference-set reading, the generation cache, the judge's bookkeeping and the report (no model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eval.generate import GenerationCache, GenerationParams, generate_replies
from eval.judge import judge_pairwise, parse_verdict
from eval.refdata import ReferenceDataError, read_reference_set
from eval.report import loss_history, write_report


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def test_reads_alpaca_sharegpt_and_openai_files(tmp_path):
    alpaca = {
        "instruction": "Translate",
        "input": "hi",
        "output": "salut",
        "system": "Be brief.",
        "history": [["q0", "a0"]],
    }
    sharegpt = {
        "conversations": [{"from": "human", "value": "你是谁？"}, {"from": "gpt", "value": "我是黄帝。"}]
    }
    openai = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
        ]
    }
    ex = read_reference_set(_jsonl(tmp_path / "a.jsonl", [alpaca, alpaca]), limit=1)
    assert len(ex) == 1 and ex[0].reference == "salut" and ex[0].row == 1
    assert ex[0].chat() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "Translate\nhi"},
    ]
    (tmp_path / "s.json").write_text(json.dumps([sharegpt], ensure_ascii=False))
    (s,) = read_reference_set(tmp_path / "s.json")
    assert s.prompt == "你是谁？" and s.reference == "我是黄帝。"
    (o,) = read_reference_set(_jsonl(tmp_path / "o.jsonl", [openai]))
    assert o.messages == (("system", "S"), ("user", "U")) and o.reference == "A"


def test_uses_the_dataset_info_column_mapping_beside_the_file(tmp_path):
    rows = [{"sys": "用四郎的口吻回答问题", "q": "你是谁？", "a": "朕乃大清天子。"}]
    (tmp_path / "persona.json").write_text(json.dumps(rows, ensure_ascii=False))
    info = {
        "persona": {"file_name": "persona.json", "columns": {"query": "q", "response": "a", "system": "sys"}}
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (ex,) = read_reference_set(tmp_path / "persona.json")
    assert ex.chat() == [
        {"role": "system", "content": "用四郎的口吻回答问题"},
        {"role": "user", "content": "你是谁？"},
    ]
    assert ex.reference == "朕乃大清天子。"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ('{"instruction": "x", "output": "y"}\n{oops\n', ":2:2: bad JSON"),
        ('{"foo": 1}\n', ":1: cannot tell the format from the columns ['foo']"),
        ('{"instruction": "x", "output": ""}\n', ":1: empty output (column 'output')"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', ":1: missing output"),
    ],
)
def test_reference_set_errors_name_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ReferenceDataError, match=re.escape(message)) as err:
        read_reference_set(path)
    assert str(path) in str(err.value)


def test_generation_cache_makes_a_rerun_free(tmp_path):
    calls: list[int] = []

    def backend(chats):
        calls.append(len(chats))
        return [c[-1]["content"].upper() for c in chats]

    chats = [[{"role": "user", "content": f"p{i}"}] for i in range(5)]
    params = GenerationParams(max_tokens=8)
    cache = GenerationCache(tmp_path / "c.sqlite")
    first = generate_replies("fp", chats, params, cache, backend, batch_size=2)
    assert [g.text for g in first] == ["P0", "P1", "P2", "P3", "P4"] and calls == [2, 2, 1]
    again = generate_replies("fp", chats + [[{"role": "user", "content": "new"}]], params, cache, backend)
    assert [g.cached for g in again] == [True] * 5 + [False] and calls[-1] == 1
    # other weights or other sampling parameters miss the cache
    generate_replies("other", chats[:1], params, cache, backend)
    generate_replies("fp", chats[:1], GenerationParams(max_tokens=9), cache, backend)
    assert calls == [2, 2, 1, 1, 1, 1]
    cache.close()


def test_judge_counts_wins_with_alternating_positions():
    assert parse_verdict(" b.") == "B" and parse_verdict("Tie") == "TIE" and parse_verdict("?") is None

    def ask(prompt: str) -> str:  # a judge that prefers whichever reply says "arr"
        a = prompt.split("Reply A:\n")[1].split("\n\nReply B:")[0]
        b = prompt.split("Reply B:\n")[1].split("\n\nAnswer")[0]
        return "TIE" if ("arr" in a) == ("arr" in b) else ("A" if "arr" in a else "B")

    base = ["hello", "hello", "hello", "arr"]
    out = judge_pairwise(
        ["p1", "p2", "p3", "p4"],
        ["arr"] * 4,
        base,
        {"pirate": ["arr", "arr", "arr", "hi"], "same": list(base)},
        ask,
    )
    assert out["targets"]["pirate"] == {
        "win_rate": 0.75,
        "wins": 3,
        "ties": 0,
        "losses": 1,
        "unreadable": 0,
        "n": 4,
    }
    assert out["targets"]["same"]["win_rate"] == 0.5 and out["targets"]["same"]["ties"] == 4


def test_loss_history_from_the_adapters_trainer_log(tmp_path):
    # One source: LLaMA-Factory's trainer_log.jsonl in the adapter folder (serve.artifacts.trainer_log);
    # the manifest holds no history, so there is no guessing where a manifest keeps one.
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5, "eval_loss": 1.7},
        {"step": 2, "eval_loss": 1.6},
    ]
    (run / "trainer_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert loss_history(run) == {"train": [(1.0, 2.0), (2.0, 1.5)], "eval": [(2.0, 1.6)]}
    (tmp_path / "trainer_log.jsonl").write_text('{"current_steps": 5, "loss": 0.9}\nnot json\n')
    assert loss_history(tmp_path) == {"train": [(5.0, 0.9)]}
    assert loss_history(tmp_path / "missing") == {}
    state = tmp_path / "hf"
    state.mkdir()  # a folder trained outside llm-train: HF Trainer's trainer_state.json
    (state / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 3, "loss": 0.5}]}))
    assert loss_history(state) == {"train": [(3.0, 0.5)]}


def test_report_writes_json_markdown_html_and_pngs(tmp_path):
    m = {"value": 0.5, "stderr": 0.1, "ci95": [0.304, 0.696], "n": 10}
    results = {
        "meta": {"title": "t", "seed": 0, "limit": 10},
        "targets": [
            {"name": "base", "kind": "local", "what": "b", "loss": {}},
            {"name": "a<1>", "kind": "local", "what": "a", "loss": {"train": [(1, 2.0), (2, 1.0)]}},
        ],
        "tasks": {
            n: {"demo_mc": {"metrics": {"acc": m}, "n": 10, "higher_is_better": {"acc": True}}}
            for n in ("base", "a<1>")
        },
        "style": {
            "n": 3,
            "targets": {
                n: {
                    "chrf": {"mean": 40.0, "ci95": [30.0, 50.0], "n": 3},
                    "length_ratio": {"value": 1.2, "n": 3},
                }
                for n in ("base", "a<1>")
            },
            "reference": {"distinct_1": 0.9},
        },
        "throughput": {"base": {"tasks": {"samples": 10, "seconds": 2.0, "samples_per_s": 5.0}}},
    }
    paths = write_report(results, tmp_path)
    assert json.loads(paths["results"].read_text())["files"]["plots"] == [
        "tasks.png",
        "style.png",
        "loss.png",
        "throughput.png",
    ]
    for png in ("tasks.png", "style.png", "loss.png", "throughput.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "| demo_mc | acc | 10 | 0.500 [0.304, 0.696] | 0.500 [0.304, 0.696] |" in md
    assert "![loss](loss.png)" in md and "5.00" in md
    assert "<img src='style.png'" in page and "a&lt;1&gt;" in page and "a<1>" not in page
