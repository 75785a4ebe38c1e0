"""Every console script answers a user's mistake the same way: one line on stderr naming it, exit 2."""

from __future__ import annotations

import pytest


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_llm_train_misspelt_key_names_file_key_and_fix(tmp_path, capsys):
    from train.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: d\noutput_dir: out\nlearning_rat: 1.0e-4\n")
    assert main([str(cfg)]) == 2
    err = one_line(capsys)
    assert err.startswith("llm-train: error: ") and str(cfg) in err
    assert "unknown key 'learning_rat' (did you mean 'learning_rate'?)" in err


def test_llm_train_passes_llamafactory_keys_through(tmp_path):
    from train.config import llamafactory_keys, load_config

    if not llamafactory_keys():
        pytest.skip("LLaMA-Factory is not installed in this environment")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: d\noutput_dir: out\nweight_decay: 0.1\nflash_attn: sdpa\nneat_packing: true\n")
    assert load_config(cfg).extra_keys() == {"weight_decay": 0.1, "flash_attn": "sdpa", "neat_packing": True}


def test_llm_eval_misspelt_key_in_config(tmp_path, capsys):
    from eval.cli import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text("suite: demo\nlimitt: 5\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = one_line(capsys)
    assert err.startswith("llm-eval: error: invalid setting in ") and str(cfg) in err
    assert "unknown key 'limitt' (did you mean 'limit'?)" in err
    assert not (tmp_path / "o").exists()


def test_llm_eval_bad_flag_is_named_as_a_flag(tmp_path, capsys):
    from eval.cli import main

    assert main(["--suite", "demo", "--limit", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--limit: limit: Input should be greater than or equal to 1" in one_line(capsys)


def test_llm_serve_misspelt_key(tmp_path, capsys):
    from serve.cli import main

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("modle: default\n")
    assert main(["--config", str(cfg)]) == 2
    err = one_line(capsys)
    assert err.startswith("llm-serve: error: ") and "unknown key 'modle' (did you mean 'model'?)" in err


def test_llm_ui_misspelt_key(tmp_path, capsys):
    from ui.cli import main

    cfg = tmp_path / "ui.yaml"
    cfg.write_text("temprature: 0.5\n")
    assert main(["--config", str(cfg)]) == 2
    assert "unknown key 'temprature' (did you mean 'temperature'?)" in one_line(capsys)


def test_llm_export_bad_flag(tmp_path, capsys):
    from train.export.cli import main

    assert main(["--adapter", "x", "--out", str(tmp_path / "o"), "--max-new-tokens", "0"]) == 2
    err = one_line(capsys)
    assert err.startswith("llm-export: error: ") and "--max-new-tokens: max_new_tokens:" in err


def test_llm_models_unknown_model(capsys):
    from serve.models.cli import main

    assert main(["path", "./no/such/model"]) == 2
    assert one_line(capsys).startswith("llm-models: error: model path no/such/model does not exist")


def test_llm_data_bad_columns(tmp_path, capsys):
    from train.data.cli import main

    (tmp_path / "d.json").write_text("[]")
    assert (
        main(
            [
                "register",
                str(tmp_path / "d.json"),
                "--name",
                "d",
                "--dataset-dir",
                str(tmp_path),
                "--columns",
                "{",
            ]
        )
        == 2
    )
    assert one_line(capsys).startswith("llm-data register: error: --columns is not valid JSON")


def test_serving_beyond_loopback_without_a_key_warns_at_start_up(tmp_path, capsys, monkeypatch):
    from serve.cli import main, open_to_network_warning

    monkeypatch.delenv("LLM_SERVE_API_KEY", raising=False)
    assert open_to_network_warning("127.0.0.1", None) is None
    assert open_to_network_warning("::1", None) is None
    assert open_to_network_warning("localhost", None) is None
    assert open_to_network_warning("0.0.0.0", "k") is None
    assert "--api-key" in open_to_network_warning("0.0.0.0", None)
    assert "--api-key" in open_to_network_warning("my-host.example", None)
    # At start-up, before anything loads (here the model is missing, so it stops right after).
    assert main(["--host", "0.0.0.0", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "llm-serve: warning: listening on 0.0.0.0 without --api-key" in err
    assert err.index("warning") < err.index("error")
