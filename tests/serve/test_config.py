"""Settings: every YAML in configs/ that targets llm-serve loads; flags beat YAML; bad values name the key."""

from pathlib import Path

import pytest

from serve.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_serve_yaml_loads_and_flags_override():
    cfg = load_config(CONFIGS / "serve.yaml", {"port": 9001, "adapters": None})
    assert cfg.model == "default" and cfg.port == 9001 and cfg.max_num_seqs == 16


def test_bad_values_name_the_setting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_num_seqs: 0\nengine: tgi\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, {})
    assert "max_num_seqs" in str(e.value) and "engine" in str(e.value) and str(bad) in str(e.value)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle: default\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(unknown, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", {})
