"""`llm-data synth` against a fake OpenAI-compatible server: retries, validation, accounting, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data_synth.fake_openai import FakeOpenAI, first_sentence
from train.data import cli
from train.data.synth import main
from train.data.validate import validate_file

DATA = Path(__file__).parent / "data"
PROSE = DATA / "prose_zh.txt"
REPO = Path(__file__).resolve().parents[2]


def synth_args(server: FakeOpenAI, out: Path, *extra: str) -> list[str]:
    return [
        str(PROSE), "--out", str(out), "--base-url", server.base_url, "--tokenizer", "server",
        "--chunk-tokens", "120", "--per-chunk", "3", "--retry-backoff", "0.01", "--no-progress", *extra,
    ]  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_retries_validation_and_accounting(tmp_path, capsys):
    out = tmp_path / "qa.json"
    with FakeOpenAI(fail_first=[429, 500, 503], bad_every=3) as server:
        assert main(synth_args(server, out, "--reply-retries", "0", "--concurrency", "2")) == 0
        good, bad = server.replies("good"), server.replies("bad")
    printed = capsys.readouterr().out
    rows = read_rows(out)
    n_chunks = len(good) + len(bad)
    assert n_chunks >= 5 and bad, "the fixture text should give several chunks, some answered without JSON"
    # One grounded entry per well-answered chunk is kept; the off-topic and answer-less ones are dropped.
    assert len(rows) == len(good)
    assert len({r["chunk_id"] for r in rows}) == len(good)
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "chunk_id", "question_type"}
        assert row["output"] in {first_sentence(g["chunk"]) for g in good}
        assert row["question_type"] == "为什么"
    assert f"chunks: {n_chunks}/{n_chunks} done (0 resumed" in printed
    assert f"entries: {len(good)} kept, {2 * len(good)} dropped, {len(bad)} replies without JSON" in printed
    assert f"dropped by reason: missing_field={len(good)}, ungrounded={len(good)}" in printed
    assert "3 retries" in printed
    assert (
        not (tmp_path / "qa.json.partial.jsonl").exists() and not (tmp_path / "qa.json.state.json").exists()
    )


def test_llm_data_synth_registers_a_valid_dataset(tmp_path, capsys):
    out = tmp_path / "novel_qa.json"
    with FakeOpenAI() as server:
        argv = ["synth", *synth_args(server, out), "--register", "novel_qa", "--dataset-dir", str(tmp_path)]
        assert cli.main(argv) == 0
    assert f"registered 'novel_qa' in {tmp_path / 'dataset_info.json'}" in capsys.readouterr().out
    entry = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))["novel_qa"]
    assert entry["file_name"] == "novel_qa.json"
    report = validate_file(out, "alpaca", columns=entry["columns"])
    assert report.ok and len(report.samples) == len(read_rows(out)) > 0


def test_reply_retries_reask_and_json_mode_fallback(tmp_path, capsys):
    out = tmp_path / "qa.jsonl"
    with FakeOpenAI(bad_every=2, reject_json_mode=True) as server:
        assert main(synth_args(server, out, "--reply-retries", "1", "--concurrency", "1")) == 0
        bad_chunks = [r["chunk"] for r in server.replies("bad")]
        # The schema is refused, then JSON mode; neither is asked for again.
        kinds = [(f or {}).get("type") for f in server.response_formats]
        assert kinds[:3] == ["json_schema", "json_object", None] and set(kinds[3:]) == {None}
        schema = server.response_formats[0]["json_schema"]
        assert schema["strict"] and schema["schema"]["required"] == ["entries"]
    # A chunk answered without JSON is asked again (same answer from this fake), so twice per bad chunk.
    assert bad_chunks and all(bad_chunks.count(c) == 2 for c in bad_chunks)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(r["output"] for r in rows)
    assert f"{len(bad_chunks)} replies without JSON" in capsys.readouterr().out


def test_refuses_to_overwrite_and_to_mix_settings(tmp_path, capsys):
    out = tmp_path / "qa.json"
    out.write_text("[1]")
    with FakeOpenAI() as server:
        assert main(synth_args(server, out)) == 1
        assert "--overwrite" in capsys.readouterr().err
        # A journal left by a run with other settings is not resumed with these.
        out.unlink()
        (tmp_path / "qa.json.state.json").write_text(json.dumps({"fingerprint": {"per_chunk": 9}}))
        assert main(synth_args(server, out)) == 1
        err = capsys.readouterr().err
        assert "per_chunk" in err and "--restart" in err
        assert main(synth_args(server, out, "--restart")) == 0
    assert read_rows(out)


def test_a_failing_chunk_stops_the_run_and_the_rerun_completes(tmp_path, capsys):
    out = tmp_path / "qa.json"
    with FakeOpenAI(fail_on={3: 500}) as server:
        args = synth_args(server, out, "--concurrency", "1", "--max-retries", "0")
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "failed after 1 attempts: HTTP 500" in err and "re-run the same command to resume" in err
        assert not out.exists()
        assert len((tmp_path / "qa.json.partial.jsonl").read_text(encoding="utf-8").splitlines()) == 2
        assert main(args) == 0
        assert "(2 resumed from the journal)" in capsys.readouterr().out
        asked = [r["chunk"] for r in server.replies() if r["kind"] != "error"]
    assert len(asked) == len(set(asked)) == len({r["chunk_id"] for r in read_rows(out)})


def test_unreachable_endpoint_is_one_clear_error(tmp_path, capsys):
    args = [str(PROSE), "--out", str(tmp_path / "x.json"), "--base-url", "http://127.0.0.1:9/v1",
            "--max-retries", "1", "--retry-backoff", "0.01", "--no-progress"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and "failed after 2 attempts" in err


def test_english_parquet_output(tmp_path):
    pd = pytest.importorskip("pandas")
    out = tmp_path / "qa.parquet"
    with FakeOpenAI() as server:
        args = synth_args(server, out, "--language", "en", "--chunk-tokens", "40")
        args[0] = str(DATA / "prose_en.txt")
        assert main(args) == 0
        sent = server.replies("good")
    frame = pd.read_parquet(out)
    assert len(frame) == len(sent) >= 2
    assert set(frame["question_type"]) <= {
        "How do you view",
        "Analyze",
        "Compare",
        "Explain",
        "Evaluate",
        "Why",
    }


@pytest.mark.slow  # kills a real llm-data process
def test_kill_and_resume_never_duplicates(tmp_path):
    out = tmp_path / "qa.json"
    journal = tmp_path / "qa.json.partial.jsonl"
    with FakeOpenAI(delay_s=0.4) as server:
        args = synth_args(server, out, "--reply-retries", "0", "--concurrency", "2", "--chunk-tokens", "60")
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "train.data.cli", "synth", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text(encoding="utf-8").count("\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert not out.exists()
        before = [json.loads(line)["chunk_id"] for line in journal.read_text(encoding="utf-8").splitlines()]
        asked_before = len(server.replies())

        server.delay_s = 0
        assert main(args) == 0
        asked_after = server.replies()[asked_before:]
        all_chunks = {r["chunk"] for r in server.replies()}
    rows = read_rows(out)
    ids = [r["chunk_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a chunk's entries were written twice"
    assert len(set(ids)) == len(all_chunks) > len(before) >= 3
    assert set(before) <= set(ids)
    # The rerun asked only for chunks not yet journaled; those in flight at the kill were asked twice.
    assert len(asked_after) == len(all_chunks) - len(before)
    assert asked_before - len(before) <= 2
    assert not journal.exists()


def test_nothing_kept_writes_nothing_and_fails_clearly(tmp_path, capsys):
    out = tmp_path / "qa.json"
    with FakeOpenAI(bad_every=1) as server:  # every reply lacks JSON
        assert main(synth_args(server, out, "--reply-retries", "0")) == 1
    err = capsys.readouterr().err
    assert "no entry survived validation" in err and str(out) in err
    assert not out.exists() and not (tmp_path / "qa.json.partial.jsonl").exists()


def test_reply_schemas_are_fully_enforceable():
    # Sent with strict: true, so llm-serve refuses a schema it could not enforce; these must pass.
    from serve.structured.schema_check import unenforced_keywords
    from train.data.synth import entries_schema
    from train.data.synth_checks import reply_schema, string_field

    schema = entries_schema(["Why", "Explain"])["schema"]
    assert unenforced_keywords(schema) == []
    items = schema["properties"]["entries"]["prefixItems"]
    assert [i["properties"]["type"] for i in items] == [{"const": "Why"}, {"const": "Explain"}]
    pairs = reply_schema("role_lines", "pairs", {"type": "object", "properties": {"input": string_field(9)}})
    assert unenforced_keywords(pairs["schema"]) == []
