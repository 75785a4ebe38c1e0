"""Every dataset format and error path of `llm-data validate`, on LLaMA-Factory's demo data and tiny files."""

from __future__ import annotations

import json

import pytest

from serve.artifacts.dataset_registry import DatasetEntry, load_dataset_info
from train.data import cli
from train.data.formats import format_for_entry
from train.data.validate import validate_file

DEMO_FORMATS = {
    "identity.json": "alpaca",
    "alpaca_en_demo.json": "alpaca",
    "alpaca_zh_demo.json": "alpaca",
    "dpo_en_demo.json": "dpo",
    "dpo_zh_demo.json": "dpo",
    "kto_en_demo.json": "kto",
    "glaive_toolcall_en_demo.json": "sharegpt",
    "c4_demo.jsonl": "pt",
}


def write(tmp_path, name: str, rows) -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path)


def problems(report) -> list[str]:
    return [str(p) for p in report.problems]


@pytest.mark.parametrize("name,fmt", sorted(DEMO_FORMATS.items()))
def test_demo_files_are_detected_and_valid(shared_demo_data, name, fmt):
    report = validate_file(shared_demo_data / name)
    assert report.format == fmt
    assert report.ok, problems(report)[:5]
    assert len(report.samples) >= 90


def test_demo_dataset_info_entries_read_the_same_rows(shared_demo_data):
    info = load_dataset_info(shared_demo_data)
    for name, raw in info.items():
        entry = DatasetEntry.from_info(raw)
        stage = "pt" if name == "c4_demo" else None
        report = validate_file(shared_demo_data / entry.file_name, entry=entry, stage=stage)
        assert report.ok, (name, problems(report)[:3])
        assert report.format == format_for_entry(entry, stage).name == DEMO_FORMATS[entry.file_name]
        assert entry.to_info() == raw  # round-trips without changing the file's meaning


def test_alpaca_rows_become_chats_with_history_and_system(tmp_path):
    row = {
        "instruction": "Add",
        "input": "2+2",
        "output": "4",
        "system": "Be terse.",
        "history": [["hi", "hello"]],
    }
    report = validate_file(write(tmp_path, "a.json", [row]))
    assert report.ok and report.format == "alpaca"
    sample = report.samples[0][1]
    assert sample.conversation() == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n2+2"},
        {"role": "assistant", "content": "4"},
    ]


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"instruction": "q"}, "missing output (column 'output')"),
        ({"instruction": "q", "output": "  "}, "empty output (column 'output')"),
        ({"instruction": "q", "output": 3}, "output (column 'output') must be a string, got int"),
        (
            {"instruction": "", "input": "", "output": "a"},
            "empty prompt: instruction and input are both empty",
        ),
        (
            {"instruction": "q", "output": "a", "history": [["only one"]]},
            "history entry 1 must be a [query, answer]",
        ),
        ({"instruction": "q", "output": "a", "system": ["x"]}, "system (column 'system') must be a string"),
    ],
)
def test_alpaca_errors_name_file_and_row(tmp_path, row, reason):
    good = {"instruction": "q", "output": "a"}
    path = write(tmp_path, "a.json", [good, row])
    report = validate_file(path, "alpaca")
    assert problems(report) == [f"{path}:2: {reason}"] or problems(report)[0].startswith(
        f"{path}:2: {reason}"
    )


def test_persona_layout_with_column_mapping(tmp_path):
    rows = [{"system": "用四郎的口吻回答问题", "question": "你是谁？", "answer": "朕乃天子。"}]
    path = write(tmp_path, "p.json", rows)
    report = validate_file(path, columns={"query": "question", "response": "answer", "system": "system"})
    assert report.ok and report.format == "alpaca"
    assert report.samples[0][1].conversation()[0] == {"role": "system", "content": "用四郎的口吻回答问题"}
    assert report.samples[0][1].response == "朕乃天子。"


def sharegpt(*turns, system=None):
    conv = [{"from": "system", "value": system}] if system else []
    conv += [{"from": f, "value": v} for f, v in turns]
    return {"conversations": conv}


@pytest.mark.parametrize(
    "row,reason",
    [
        (
            sharegpt(("gpt", "hi"), ("human", "x")),
            "wrong role order: message 1 is 'gpt', expected 'human' or 'observation'",
        ),
        (sharegpt(("human", "a"), ("human", "b")), "wrong role order: message 2 is 'human'"),
        (sharegpt(("user", "a"), ("gpt", "b")), "unknown role tag 'user' in message 1"),
        (sharegpt(("human", "a")), "missing output: the last message must be from the assistant ('gpt')"),
        (sharegpt(("human", "a"), ("gpt", "")), "empty output: assistant message 2 has no content"),
        ({"conversations": "hi"}, "messages (column 'conversations') must be a list"),
        ({"conversations": []}, "no messages"),
        ({"conversations": [{"from": "human"}]}, "message 1 must be an object with 'from' and 'value'"),
    ],
)
def test_sharegpt_errors(tmp_path, row, reason):
    path = write(tmp_path, "s.json", [sharegpt(("human", "q"), ("gpt", "a")), row])
    report = validate_file(path, "sharegpt")
    assert len(report.problems) == 1
    assert str(report.problems[0]).startswith(f"{path}:2: {reason}")


def test_sharegpt_system_message_and_multi_turn(tmp_path):
    row = sharegpt(("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d"), system="sys")
    report = validate_file(write(tmp_path, "s.json", [row]))
    assert report.ok and report.format == "sharegpt"
    sample = report.samples[0][1]
    assert sample.system == "sys" and len(sample.messages) == 3 and sample.response == "d"


def test_openai_messages_system_optional_multi_turn_jsonl(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        },
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        {"messages": [{"role": "narrator", "content": "x"}]},
    ]
    path = write(tmp_path, "o.jsonl", rows)
    report = validate_file(path)
    assert report.format == "openai"
    assert [str(p) for p in report.problems] == [
        f"{path}:3: wrong role order: message 1 is 'assistant', expected 'user' or 'tool'",
        f"{path}:4: unknown role tag 'narrator' in message 1 (expected one of 'user', 'tool', 'assistant', "
        "'function_call', 'system')",
    ]
    assert report.entry.tags["role_tag"] == "role" and report.entry.columns["messages"] == "messages"
    assert report.samples[1][1].system == "s"


GOOD = {"from": "gpt", "value": "good"}
BAD = {"from": "gpt", "value": "bad"}
KEEP = "keep"


def dpo_row(chosen=KEEP, rejected=KEEP, turns=None):
    """A DPO row; pass None to leave a response out."""
    chosen, rejected = (GOOD if chosen == KEEP else chosen), (BAD if rejected == KEEP else rejected)
    row = {
        "conversations": turns or [{"from": "human", "value": "q"}],
        "chosen": chosen,
        "rejected": rejected,
    }
    return {k: v for k, v in row.items() if v is not None}


@pytest.mark.parametrize(
    "row,reason",
    [
        (dpo_row(chosen=None), "missing chosen (column 'chosen')"),
        (dpo_row(rejected={"from": "gpt", "value": ""}), "empty rejected response"),
        (dpo_row(chosen={"from": "human", "value": "x"}), "chosen has role 'human', expected 'gpt'"),
        (dpo_row(chosen="plain"), "missing chosen: column 'chosen' must be a message object"),
        (
            dpo_row(turns=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]),
            "the prompt must end with a user message",
        ),
    ],
)
def test_dpo_errors(tmp_path, row, reason):
    path = write(tmp_path, "d.json", [dpo_row(), row])
    report = validate_file(path, "dpo")
    assert [str(p) for p in report.problems] == [f"{path}:2: {reason}"] or str(report.problems[0]).startswith(
        f"{path}:2: {reason}"
    )


def test_dpo_alpaca_layout(tmp_path):
    rows = [{"instruction": "q", "chosen": "good", "rejected": "bad"}, {"instruction": "q", "chosen": "good"}]
    path = write(tmp_path, "d.json", rows)
    report = validate_file(path)
    assert report.format == "dpo" and report.entry.ranking
    assert [str(p) for p in report.problems] == [f"{path}:2: missing rejected (column 'rejected')"]
    assert report.samples[0][1].rejected == "bad"


@pytest.mark.parametrize(
    "label,ok", [(True, True), (False, True), ("true", False), (1, False), (None, False)]
)
def test_kto_label_must_be_boolean(tmp_path, label, ok):
    row = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "label": label,
    }
    path = write(tmp_path, "k.json", [row])
    report = validate_file(path, "kto")
    assert report.ok is ok
    if not ok:
        assert (
            str(report.problems[0])
            == f"{path}:1: KTO label (column 'label') must be true or false, got {label!r}"
        )


def test_pretrain_text(tmp_path):
    path = write(tmp_path, "t.jsonl", [{"text": "hello world"}, {"text": ""}])
    report = validate_file(path)
    assert report.format == "pt"
    assert [str(p) for p in report.problems] == [f"{path}:2: empty text (column 'text')"]


def test_not_utf8_reports_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    report = validate_file(path)
    assert len(report.problems) == 1
    assert str(report.problems[0]).startswith(f"{path}:2: not UTF-8 (byte 0xe9")


def test_bad_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n')
    report = validate_file(path)
    assert [str(p) for p in report.problems] == [f"{path}:3:23: bad JSON: Expecting ',' delimiter"]


def test_bad_jsonl_line_keeps_other_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n{"text": "c"}\n')
    report = validate_file(path)
    assert [str(p) for p in report.problems] == [f"{path}:2:10: bad JSON: Expecting value"]
    assert [n for n, _ in report.samples] == [1, 3]


def test_row_that_is_not_an_object(tmp_path):
    path = write(tmp_path, "x.json", [{"text": "a"}, "just a string"])
    report = validate_file(path, "pt")
    assert [str(p) for p in report.problems] == [f"{path}:2: row is a str, expected a JSON object"]


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "a.csv"
    csv_path.write_text('instruction,input,output\n"Say hi","","Hi!"\n"Add","1+1",""\n', encoding="utf-8")
    report = validate_file(csv_path)
    assert report.format == "alpaca"
    assert [str(p) for p in report.problems] == [f"{csv_path}:2: empty output (column 'output')"]

    pq_path = tmp_path / "k.parquet"
    rows = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "label": True,
        },
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
            "label": False,
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), pq_path)
    report = validate_file(pq_path)
    assert report.format == "kto" and report.ok
    assert report.counts()["kto_desirable"] == 1 and report.counts()["kto_undesirable"] == 1


def test_unsupported_suffix_and_missing_file(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    assert "unsupported file type '.txt'" in str(validate_file(tmp_path / "a.txt").problems[0])
    assert str(validate_file(tmp_path / "nope.json").problems[0]).endswith(": file not found")


def test_unknown_columns_ask_for_format(tmp_path):
    report = validate_file(write(tmp_path, "u.json", [{"q": "a", "b": "c"}]))
    assert "cannot tell the format from the columns ['b', 'q']; pass --format" in str(report.problems[0])


def test_validate_cli_exit_codes_and_output(tmp_path, capsys):
    good = write(tmp_path, "good.json", [{"instruction": "q", "output": "a"}])
    bad = write(
        tmp_path, "bad.json", [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}]
    )
    assert cli.main(["validate", good, "--model", "none"]) == 0
    assert "format alpaca; rows 1, valid 1, problems 0" in capsys.readouterr().out
    assert cli.main(["validate", bad, "--model", "none"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: empty output (column 'output')" in out
    assert cli.main(["validate", good, "--model", "none", "--columns", "{bad"]) == 2
    assert "--columns is not valid JSON" in capsys.readouterr().err


def test_subcommand_registry_shape():
    names = []
    for module in cli.SUBCOMMANDS:
        assert callable(module.add_parser) and callable(module.run)
    parser = cli.build_parser()
    for action in parser._subparsers._group_actions:
        names += list(action.choices)
    assert names[:3] == ["validate", "preview", "register"]


TOOLS = json.dumps([{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {}}}}])
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})


def tool_row(*turns, tools=TOOLS):
    return {**sharegpt(*turns), "tools": tools}


@pytest.mark.parametrize(
    "row,reason",
    [
        (
            tool_row(("human", "w?"), ("function_call", CALL), tools="[{oops"),
            "tools (column 'tools') is not valid JSON",
        ),
        (
            tool_row(("human", "w?"), ("gpt", "a"), tools='{"name": "x"}'),
            "tools (column 'tools') must be a JSON list",
        ),
        (tool_row(("human", "w?"), ("gpt", "a"), tools='[{"description": "x"}]'), "tool 1 in tools"),
        (
            tool_row(("human", "w?"), ("function_call", "get_weather(Paris)")),
            "turn 2: function call is not valid JSON",
        ),
        (
            tool_row(("human", "w?"), ("function_call", json.dumps({"name": "nuke", "arguments": {}}))),
            "turn 2: function call names 'nuke', which is not a declared tool (get_weather)",
        ),
        (
            tool_row(
                ("human", "w?"), ("function_call", json.dumps({"name": "get_weather", "arguments": "Paris"}))
            ),
            "turn 2: arguments of 'get_weather' must be a JSON object",
        ),
        (
            tool_row(("human", "w?"), ("gpt", "hm"), ("observation", "{}"), ("gpt", "ok")),
            "turn 3: an observation (tool result) must follow a function call",
        ),
        (
            sharegpt(("human", "w?"), ("function_call", CALL), ("observation", "{}"), ("gpt", "ok")),
            "turn 2: function call names 'get_weather', which is not a declared tool (none",
        ),
    ],
)
def test_tool_row_errors_name_file_and_row(tmp_path, row, reason):
    good = tool_row(("human", "w?"), ("function_call", CALL), ("observation", '{"t": 1}'), ("gpt", "21 C"))
    path = write(tmp_path, "t.json", [good, row])
    report = validate_file(path, "sharegpt")
    assert [str(p) for p in report.problems] and str(report.problems[0]).startswith(f"{path}:2: {reason}")
    assert len(report.samples) == 1


def test_tool_rows_become_openai_tool_calls(tmp_path):
    row = tool_row(("human", "w?"), ("function_call", CALL), ("observation", '{"t": 1}'), ("gpt", "21 C"))
    sample = validate_file(write(tmp_path, "t.json", [row])).samples[0][1]
    assert sample.has_tools and sample.tools[0]["name"] == "get_weather"
    chat = sample.conversation()
    assert [m["role"] for m in chat] == ["user", "assistant", "tool", "assistant"]
    call = chat[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert chat[2]["tool_call_id"] == call["id"]
