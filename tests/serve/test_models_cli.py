"""`llm-models`: path/pull resolve the default model; list finds cached models and adapters."""

import json

from serve.models.cli import main
from tests.helpers.adapters import make_lora_adapter


def test_path_prints_default_checkpoint(default_model, capsys):
    assert main(["path", "default"]) == 0
    assert capsys.readouterr().out.strip() == str(default_model.path)
    assert main(["pull"]) == 0


def test_list_shows_default_and_adapters(default_model, tiny_model_dir, tmp_path, capsys):
    saves = tmp_path / "saves"
    make_lora_adapter(tiny_model_dir, saves / "huangdi", r=4)
    (saves / ".partial" / "x").mkdir(parents=True)
    (saves / ".partial" / "x" / "adapter_config.json").write_text("{}")
    assert main(["list", "--saves", str(saves), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["default"]["bootstrapped"] and data["default"]["path"] == str(default_model.path)
    assert [(a["name"], a["rank"], a["servable"]) for a in data["adapters"]] == [("huangdi", 4, True)]
    assert main(["list", "--saves", str(saves)]) == 0
    assert "adapter  huangdi" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["path", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
