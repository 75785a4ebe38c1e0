"""`llm-data register`, and the files a run writes: progress tail, loss plot, checksum cache (no model)."""

from __future__ import annotations

import json
import stat

import pytest

from serve.artifacts.dataset_registry import DatasetInfoError, find_entry, load_dataset_info
from serve.artifacts.provenance import file_sha256
from train.data import cli
from train.data.register import RegisterError, register_dataset
from train.manifest import read_metrics
from train.plot import plot_loss
from train.progress import TrainerLogTail


def test_register_demo_files_like_llamafactory(tmp_path, shared_demo_data):
    expected = json.loads((shared_demo_data / "dataset_info.json").read_text())
    for name in ("dpo_en_demo", "glaive_toolcall_en_demo", "c4_demo", "identity"):
        src = shared_demo_data / expected[name]["file_name"]
        entry, replaced = register_dataset(src, name, tmp_path)
        assert not replaced
        info = entry.to_info()
        assert info["file_name"] == str(src.resolve())  # outside the dataset dir: absolute
        assert info.get("formatting", "alpaca") == expected[name].get("formatting", "alpaca")
        assert info.get("ranking", False) == expected[name].get("ranking", False)
        for key, column in expected[name].get("columns", {}).items():
            assert info["columns"][key] == column
    kto, _ = register_dataset(shared_demo_data / "kto_en_demo.json", "kto_en_demo", tmp_path)
    assert kto.columns == {"messages": "messages", "kto_tag": "label"}
    assert {k: kto.tags[k] for k in expected["kto_en_demo"]["tags"]} == expected["kto_en_demo"]["tags"]
    assert sorted(load_dataset_info(tmp_path)) == [
        "c4_demo",
        "dpo_en_demo",
        "glaive_toolcall_en_demo",
        "identity",
        "kto_en_demo",
    ]


def test_register_keeps_other_entries_updates_and_is_readable(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "x.json", "custom": 1}}))
    data = tmp_path / "persona.json"
    data.write_text(json.dumps([{"system": "s", "input": "q", "output": "a"}], ensure_ascii=False))
    entry, replaced = register_dataset(data, "persona", tmp_path)
    assert not replaced and entry.file_name == "persona.json"  # inside the dataset dir: relative
    assert entry.columns == {"query": "input", "response": "output", "system": "system"}
    _, replaced = register_dataset(
        data, "persona", tmp_path, columns={"query": "input", "response": "output"}
    )
    assert replaced
    info = load_dataset_info(tmp_path)
    assert info["other"] == {"file_name": "x.json", "custom": 1}
    assert info["persona"]["columns"] == {"query": "input", "response": "output"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dataset_info.json",
        "persona.json",
    ]  # no temp files
    assert stat.S_IMODE((tmp_path / "dataset_info.json").stat().st_mode) == 0o644
    found, path = find_entry(tmp_path, "persona")
    assert path == tmp_path / "persona.json" and found.column("system") is None
    with pytest.raises(
        DatasetInfoError,
        match=r"dataset .nope. is not in .* \(registered: other, persona\); add it with .llm-data register",
    ):
        find_entry(tmp_path, "nope")


def test_register_refuses_invalid_file(tmp_path, capsys):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "q", "output": ""}]))
    with pytest.raises(RegisterError, match=f"{data}:1: empty output"):
        register_dataset(data, "bad", tmp_path)
    assert not (tmp_path / "dataset_info.json").exists()
    assert cli.main(["register", str(data), "--name", "bad", "--dataset-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err  # on stderr, as every CLI error (it went to stdout before)
    assert "fix them first" in err and err.startswith("llm-data register: error: ")


def test_register_cli_prints_entry(tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert cli.main(["register", str(data), "--name", "t", "--dataset-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "added 't'" in out and '"prompt": "text"' in out


def test_trainer_log_tail_reads_only_complete_lines(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    tail = TrainerLogTail(log)
    assert tail.read_new() == []
    log.write_text('{"current_steps": 1, "loss": 2.0}\n{"current_steps": 2, "lo')
    assert tail.read_new() == [{"current_steps": 1, "loss": 2.0}]
    with open(log, "a") as f:
        f.write('ss": 1.5}\n')
    assert tail.read_new() == [{"current_steps": 2, "loss": 1.5}]


def test_loss_plot_and_metrics(tmp_path):
    rows = [
        {"current_steps": 1, "total_steps": 4, "loss": 2.0, "total_tokens": 100},
        {"current_steps": 2, "total_steps": 4, "loss": 1.5, "total_tokens": 200},
        {"current_steps": 2, "total_steps": 4, "eval_loss": 1.7},
        {"current_steps": 4, "total_steps": 4, "loss": 1.2, "total_tokens": 400},
        {"current_steps": 4, "total_steps": 4, "eval_loss": 1.4},
    ]
    (tmp_path / "trainer_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "all_results.json").write_text(
        json.dumps({"train_runtime": 8.0, "num_input_tokens_seen": 400})
    )
    png = plot_loss(rows, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = read_metrics(tmp_path)
    assert (
        metrics["final_loss"] == 1.2
        and metrics["best_eval_loss"] == 1.4
        and metrics["tokens_per_second"] == 50.0
    )
    assert plot_loss([], tmp_path / "none.png") is None


def test_sha256_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SERVE_HOME", str(tmp_path / "home"))
    big = tmp_path / "w.bin"
    big.write_bytes(b"a" * (2 << 20))
    first = file_sha256(big)
    cache = json.loads((tmp_path / "home" / "sha256-cache.json").read_text())
    assert list(cache.values()) == [first]
    key = next(iter(cache))
    cache[key] = "cached"
    (tmp_path / "home" / "sha256-cache.json").write_text(json.dumps(cache))
    assert file_sha256(big) == "cached"  # same path, size and mtime: not re-read
