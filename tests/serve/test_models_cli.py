"""`llm-models`: path/pull resolve the default model; list finds cached models and adapters."""

import gzip
import json

import pytest

from serve.models.cli import main
from tests.helpers.adapters import make_lora_adapter
from tests.helpers.models import REAL_TOKENIZER


@pytest.mark.slow  # resolves (and on first use converts) the real default model
def test_path_prints_default_checkpoint(default_model, capsys):
    assert main(["path", "default"]) == 0
    assert capsys.readouterr().out.strip() == str(default_model.path)
    assert main(["pull"]) == 0


@pytest.mark.slow  # the real default model must be bootstrapped
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


@pytest.mark.slow  # the real default model
def test_test_tokenizer_is_the_default_models(default_model):
    """The fast tests' copy of the tokenizer (tests/data/smollm2-tokenizer) is what the conversion writes."""
    assert (
        gzip.decompress((REAL_TOKENIZER / "tokenizer.json.gz").read_bytes())
        == (default_model.path / "tokenizer.json").read_bytes()
    )
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (REAL_TOKENIZER / name).read_text() == (default_model.path / name).read_text(), name
