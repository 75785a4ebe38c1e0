"""`llm-data extract-role`: exact pairs from a speaker-labelled script, and the LLM mode for prose."""

from __future__ import annotations

import json
from pathlib import Path

from tests.data_synth.fake_openai import FakeOpenAI
from train.data import cli
from train.data.extract_role import extract_script, main, strip_directions
from train.data.validate import validate_file

DATA = Path(__file__).parent / "data"
SCRIPT = DATA / "script_zh.txt"
PROSE = DATA / "prose_zh.txt"
SYSTEM = "用四郎的口吻回答问题"

EXPECTED = [
    ("臣妾给皇上请安，皇上万福金安。", "起来吧。今日怎么有空到园子里来？"),
    ("桃花开得好，臣妾想折几枝，供在殿里。", "朕也正想出来走走。你陪朕去湖边看看。"),
    ("皇上，敬事房的人在外头候着。", "让他们等着。"),
    ("微臣参见皇上。", "免礼。甄嬛的身子如何了？"),
    ("回皇上的话，娘娘只是略感风寒，服两剂药便好。", "那就好。你且退下。"),
]


def test_script_pairs_exact():
    result = extract_script(SCRIPT.read_text(encoding="utf-8"), "四郎", ["皇帝", "皇上"], SYSTEM)
    assert result.rows == [
        {"system": SYSTEM, "instruction": "", "input": i, "output": o} for i, o in EXPECTED
    ]
    # The opening line of the role has nobody before it; four bracketed lines are directions only;
    # the act title is narration; 皇帝's two consecutive lines are one turn.
    assert result.counts == {
        "role_turns": 6,
        "dropped_no_preceding_line": 1,
        "stage_direction_lines": 4,
        "narration_lines": 1,
        "merged_lines": 1,
    }
    assert result.speakers["甄嬛"] == 3 and result.speakers["苏培盛"] == 1


def test_without_aliases_only_the_named_speaker_counts():
    result = extract_script(SCRIPT.read_text(encoding="utf-8"), "四郎", [])
    assert [(r["input"], r["output"]) for r in result.rows] == [
        ("皇上，敬事房的人在外头候着。", "让他们等着。"),
        ("微臣参见皇上。", "免礼。甄嬛的身子如何了？"),
    ]
    assert result.rows[0]["system"] == ""


def test_english_script_ascii_colons_and_directions():
    text = (
        "[A garden at dusk]\n"
        "ALICE: Where have you been all day?\n"
        "BOB (smiling): Out by the river.\n"
        "Bob: I caught nothing.\n"
        "LADY ANNE: Then why smile?\n"
        "BOB: (shrugs) Because the river was kind.\n"
    )
    result = extract_script(text, "BOB", ["Bob"])
    assert [(r["input"], r["output"]) for r in result.rows] == [
        ("Where have you been all day?", "Out by the river. I caught nothing."),
        ("Then why smile?", "Because the river was kind."),
    ]


def test_strip_directions_nested_and_gaps():
    assert strip_directions("皇上（笑（轻声））：好。 [停顿] 去吧。") == "皇上：好。去吧。"
    assert strip_directions("（众人退下）") == ""


def test_cli_writes_registers_and_prints_counts_and_sample(tmp_path, capsys):
    out = tmp_path / "data" / "huangdi.json"
    argv = [str(SCRIPT), "--role", "四郎", "--alias", "皇帝,皇上", "--system", SYSTEM, "--out", str(out)]
    assert cli.main(["extract-role", *argv, "--register", "huangdi", "--dataset-dir", str(out.parent)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["input"], r["output"]) for r in rows] == EXPECTED
    assert list(rows[0]) == ["system", "instruction", "input", "output"]
    printed = capsys.readouterr().out
    assert "mode: script; wrote 5 rows" in printed and "dropped_no_preceding_line=1" in printed
    assert json.dumps(rows[0], ensure_ascii=False) in printed
    info = json.loads((out.parent / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["huangdi"] == {
        "file_name": "huangdi.json",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"},
    }
    report = validate_file(out, "alpaca", columns=info["huangdi"]["columns"])
    assert report.ok and report.samples[0][1].system == SYSTEM
    # Refuses to overwrite; jsonl on request.
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "h.jsonl")]) == 0
    capsys.readouterr()
    assert len((tmp_path / "h.jsonl").read_text(encoding="utf-8").splitlines()) == 5


def test_cli_unknown_role_and_prose_without_llm_are_clear_errors(tmp_path, capsys):
    assert main([str(SCRIPT), "--role", "果郡王", "--out", str(tmp_path / "a.json")]) == 1
    assert "no lines of '果郡王'" in capsys.readouterr().err
    assert main([str(PROSE), "--role", "四郎", "--out", str(tmp_path / "b.json")]) == 1
    assert "--llm" in capsys.readouterr().err


def test_llm_mode_keeps_only_lines_found_in_the_text(tmp_path, capsys):
    out = tmp_path / "prose_pairs.json"
    with FakeOpenAI(mode="extract", fail_first=[500]) as server:
        argv = [
            str(PROSE), "--role", "四郎", "--alias", "皇上", "--system", SYSTEM, "--out", str(out),
            "--llm", server.base_url, "--tokenizer", "server", "--chunk-tokens", "200", "--overlap", "0",
            "--retry-backoff", "0.01", "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
        n_replies = len(server.replies("good"))
    rows = json.loads(out.read_text(encoding="utf-8"))
    pairs = [(r["input"], r["output"]) for r in rows]
    # The fake quotes every line that follows 四郎's name; the invented line of each reply is dropped.
    assert ("皇上，歇一歇吧，这茶是新贡的。", "放着。西北的军报到了没有？") in pairs
    assert all("原文里没有" not in o for _, o in pairs)
    assert all(r["system"] == SYSTEM for r in rows)
    printed = capsys.readouterr().out
    assert "mode: llm" in printed and f"dropped_output_not_in_text={n_replies}" in printed
