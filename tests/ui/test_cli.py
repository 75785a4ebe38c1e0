"""`llm-ui` settings: flags over YAML over defaults, and refusals a user can act on."""

from __future__ import annotations

import pytest

from ui.cli import main
from ui.config import UIConfigError, load_config


def test_flags_override_yaml(tmp_path):
    cfg = tmp_path / "ui.yaml"
    cfg.write_text("base-url: http://a:1\nport: 9000\nmax_tokens: 64\n")
    config = load_config(cfg, {"port": 9001, "api_key": None})
    assert (config.base_url, config.port, config.max_tokens) == ("http://a:1", 9001, 64)


def test_bad_setting_names_the_file_and_field(tmp_path):
    cfg = tmp_path / "ui.yaml"
    cfg.write_text("temperature: 5\n")
    with pytest.raises(UIConfigError, match=r"in .*ui.yaml: temperature"):
        load_config(cfg, {})


def test_main_refuses_feedback_dir_that_is_a_file(tmp_path, capsys):
    not_a_dir = tmp_path / "feedback"
    not_a_dir.write_text("x")
    assert main(["--feedback-dir", str(not_a_dir)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_main_reports_missing_config(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_tab_needs_an_adapter_dir_and_a_key_beyond_loopback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLM_SERVE_API_KEY", raising=False)
    with pytest.raises(UIConfigError, match="ui_train needs --adapter-dir DIR"):
        load_config(None, {"ui_train": True})
    with pytest.raises(UIConfigError, match="beyond loopback\\) needs --api-key"):
        load_config(None, {"ui_train": True, "adapter_dirs": [str(tmp_path)], "host": "0.0.0.0"})
    config = load_config(
        None, {"ui_train": True, "adapter_dirs": [str(tmp_path)], "host": "0.0.0.0", "api_key": "k"}
    )
    assert config.adapter_dirs == [tmp_path]
    assert main(["--ui-train"]) == 2
    assert "ui_train needs --adapter-dir" in capsys.readouterr().err
