"""`llm-eval`'s errors a user can act on, and task planning on the shipped suite (no model loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.cli import main
from eval.tasks import TaskError, _metrics, load_suite, plan_tasks, wilson_interval
from tests.helpers.server import free_port

ROW = {"instruction": "Say hi", "output": "Hi there."}


@pytest.fixture
def ref(tmp_path) -> Path:
    path = tmp_path / "ref.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    return path


def _fake_base(path: Path) -> Path:
    # Enough for resolve_model to accept it as a checkpoint; nothing here loads weights.
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_nothing_to_evaluate_is_a_usage_error(capsys):
    assert main(["--out", "x"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_refuses_a_non_empty_out_without_overwrite(tmp_path, ref, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    assert main(["--data", str(ref), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "old.txt").read_text() == "keep me"


def test_empty_reference_set(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "empty.jsonl is empty" in capsys.readouterr().err


def test_adapter_trained_on_another_base_is_refused(tmp_path, ref, capsys):
    base = _fake_base(tmp_path / "base")
    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "Qwen/Qwen2.5-7B", "r": 8})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    args = [
        "--model",
        str(base),
        "--adapter",
        f"a={adapter}",
        "--data",
        str(ref),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "was trained on 'Qwen/Qwen2.5-7B'" in err and "--allow-base-mismatch" in err
    assert not (tmp_path / "o").exists()


def test_unreachable_server(tmp_path, ref, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["--base-url", url, "--data", str(ref), "--out", str(tmp_path / "o")]) == 2
    assert f"cannot reach the server at {url}" in capsys.readouterr().err


def test_unknown_suite_lists_the_shipped_ones(tmp_path, ref, capsys):
    assert main(["--suite", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown suite 'nope'; shipped suites: demo" in capsys.readouterr().err


def test_unknown_task_lists_local_tasks_and_close_names():
    suite = load_suite("demo")
    with pytest.raises(TaskError) as err:
        plan_tasks(["demo_mcq"], suite.include_paths)
    msg = str(err.value)
    assert "unknown task 'demo_mcq' (close: demo_mc" in msg and "Local tasks: demo_gen, demo_mc" in msg


def test_demo_suite_plan_uses_chat_template_only_for_generation():
    suite = load_suite("demo")
    plan = plan_tasks(suite.task_names(), suite.include_paths, chat_overrides=suite.chat_overrides())
    assert plan.output_types == {"demo_mc": "multiple_choice", "demo_gen": "generate_until"}
    assert plan.groups() == [(False, ["demo_mc"]), (True, ["demo_gen"])]
    assert not plan.use_defaults  # lm-eval's 14k-task index is not built for local tasks
    forced = plan_tasks(["demo_mc"], suite.include_paths, chat_mode="on")
    assert forced.chat == {"demo_mc": True}


def test_lm_eval_metrics_become_value_stderr_ci():
    raw = {
        "alias": "demo_mc",
        "acc,none": 0.5,
        "acc_stderr,none": 0.1,
        "contains,strip": 1.0,
        "contains_stderr,strip": "N/A",
        "perplexity,none": 12.0,
        "perplexity_stderr,none": 1.0,
    }
    out = _metrics(raw, n=10)
    # proportions: Wilson interval; 5/10 -> centre 0.5, half-width 0.2634 (stays inside [0, 1])
    assert out["acc"]["ci95"] == [pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4)]
    assert out["acc"]["stderr"] == 0.1 and out["acc"]["n"] == 10
    assert out["contains[strip]"]["ci95"] == [pytest.approx(0.7225, abs=1e-4), 1.0]
    assert out["contains[strip]"]["stderr"] is None
    # anything else: value +- 1.96 stderr
    assert out["perplexity"]["ci95"] == [pytest.approx(10.04), pytest.approx(13.96)]
    assert wilson_interval(0.0, 2)[0] == 0.0


def test_flags_override_the_config_yaml(tmp_path):
    from eval.cli import build_parser, config_from_args

    (tmp_path / "eval.yaml").write_text("suite: demo\nlimit: 5\nmax_tokens: 32\nadapters: [a=x]\n")
    args = build_parser().parse_args(
        ["--config", str(tmp_path / "eval.yaml"), "--limit", "7", "--tasks", "t1, t2"]
    )
    cfg = config_from_args(args)
    assert (cfg.suite, cfg.limit, cfg.max_tokens, cfg.adapters, cfg.tasks) == (
        "demo",
        7,
        32,
        ["a=x"],
        ["t1", "t2"],
    )
    assert cfg.chat_template == "auto" and cfg.temperature == 0.0 and cfg.overwrite is False
