"""The Train tab's parts without a browser: form -> YAML, dataset catalogue and drops, HTML, adapter loading."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from train.data.preview import Preview, PreviewRow, Rendered, Span
from ui.training.datasets import DatasetCatalog, DatasetRefused
from ui.training.render import loss_svg, preview_html, status_html
from ui.training.runs import Progress, RunRecord
from ui.training.serving import AdapterPublisher, ServeError
from ui.training.settings import SettingsError, build_config, config_yaml, form_settings, save_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "data" / "demo"


# --- settings -----------------------------------------------------------------------------------------
def test_form_values_become_llm_train_yaml_with_its_defaults(tmp_path):
    settings = form_settings(
        stage="sft",
        lora_rank=16.0,
        lora_alpha=0.0,
        max_steps=0.0,
        cutoff_len=64.0,
        val_size=0.25,
        advanced="",
    )
    assert (settings.lora_rank, settings.lora_alpha, settings.max_steps) == (16, None, -1)
    assert (settings.learning_rate, settings.per_device_train_batch_size) == (1e-4, 4)  # llm-train's defaults
    settings = settings.model_copy(update={"advanced": "warmup_ratio: 0.1\ntemplate: smollm2\n"})
    cfg = build_config(
        settings, base_model="default", dataset="d", dataset_dir=DEMO, output_dir=tmp_path / "o"
    )
    assert cfg["warmup_ratio"] == 0.1 and cfg["val_size"] == 0.25 and cfg["finetuning_type"] == "lora"
    assert "lora_alpha" not in cfg  # llm-train's default: 2 x rank
    text = config_yaml(cfg, Path("configs/train/o.yaml"))
    assert text.startswith(
        "# Written by llm-serve's Train tab. Run again with: llm-train configs/train/o.yaml"
    )
    assert yaml.safe_load(text) == cfg


@pytest.mark.parametrize(
    ("advanced", "message"),
    [
        ("output_dir: /etc", "output_dir are set by the page"),
        ("dataset: x\nmodel_name_or_path: y", "dataset, model_name_or_path are set by the page"),
        ("- a\n- b", "expected `key: value` lines"),
        ("a: [", "not valid YAML"),
        ("early_stopping_steps: 2", "early_stopping_steps needs an evaluation set"),
        ("tokenized_path: /tmp/x\nlogging_dir: /var", "logging_dir, tokenized_path name files or folders"),
    ],
)
def test_advanced_box_errors_name_the_problem(tmp_path, advanced, message):
    settings = form_settings(advanced=advanced)
    with pytest.raises(SettingsError, match=message):
        build_config(settings, base_model="default", dataset="d", dataset_dir=DEMO, output_dir=tmp_path)


def test_bad_form_value_names_the_field():
    with pytest.raises(SettingsError, match="learning_rate: Input should be greater than 0"):
        form_settings(learning_rate=0.0)


def test_save_never_replaces_a_file_the_page_did_not_write(tmp_path):
    cfg = {"dataset": "d", "output_dir": "/o"}
    path = save_config(cfg, tmp_path, "run1")
    assert yaml.safe_load(path.read_text()) == cfg
    save_config({**cfg, "max_steps": 3}, tmp_path, "run1")  # its own file: replaced
    (tmp_path / "mine.yaml").write_text("dataset: precious\n")
    with pytest.raises(SettingsError, match="was not written by this page"):
        save_config(cfg, tmp_path, "mine")
    assert (tmp_path / "mine.yaml").read_text() == "dataset: precious\n"


# --- datasets -----------------------------------------------------------------------------------------
def test_catalogue_lists_entries_by_kind_and_skips_files_outside(tmp_path):
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text("[]")
    info = {
        "feedback_kto": {"file_name": "kto.jsonl", "formatting": "sharegpt", "columns": {"kto_tag": "label"}},
        "feedback_dpo": {"file_name": "dpo.jsonl", "ranking": True, "formatting": "sharegpt"},
        "escape": {"file_name": "../outside.json"},
        "hub": {"hf_hub_url": "someone/data"},
    }
    (feedback / "dataset_info.json").write_text(json.dumps(info))
    choices, notes = DatasetCatalog([DEMO, feedback]).scan()
    assert [(c.name, c.kind) for c in choices] == [
        ("huangdi_demo", "sft"),
        ("feedback_kto", "kto"),
        ("feedback_dpo", "dpo"),
    ]
    assert notes == [f"escape in {feedback}: its file ../outside.json lies outside the directory"]
    assert DatasetCatalog([DEMO]).get(choices[0].key).file == DEMO / "huangdi_demo.json"
    with pytest.raises(DatasetRefused, match="not registered"):
        DatasetCatalog([DEMO]).get(choices[1].key)


def test_dropped_file_is_registered_only_when_every_row_is_valid(tmp_path):
    data = tmp_path / "data"
    drop = tmp_path / "upload" / "my rows.jsonl"
    drop.parent.mkdir()
    drop.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "x", "output": ""}\n')
    catalog = DatasetCatalog([data])
    report = catalog.check_upload(drop)
    assert [str(p) for p in report.problems] == [f"{drop}:2: empty output (column 'output')"]
    with pytest.raises(DatasetRefused, match="1 problems; fix them"):
        catalog.register_upload(drop, data, "mine")
    assert not data.exists()  # nothing written

    drop.write_text('{"instruction": "hi", "output": "hello"}\n')
    choice = catalog.register_upload(drop, data, "mine")
    assert (choice.name, choice.kind, choice.file) == ("mine", "sft", data / "my_rows.jsonl")
    assert json.loads((data / "dataset_info.json").read_text())["mine"]["file_name"] == "my_rows.jsonl"
    with pytest.raises(DatasetRefused, match="already registered"):
        catalog.register_upload(drop, data, "mine")
    with pytest.raises(DatasetRefused, match="already exists; rename the file"):
        catalog.register_upload(drop, data, "mine2")
    with pytest.raises(DatasetRefused, match="not one of the page's dataset directories"):
        catalog.register_upload(drop, tmp_path, "elsewhere")


# --- HTML ---------------------------------------------------------------------------------------------
def test_preview_html_marks_trained_tokens_and_lists_problems():
    part = Rendered("input", [1, 2], [-100, 2], 2, [Span("<user>hi & bye", False), Span("<b>ok</b>", True)])
    preview = Preview(
        "f.json", "f", "alpaca", "sft", "smollm2", None, 64, 3, 2, problems=["f.json:3: empty output"]
    )
    preview.rows = [PreviewRow(1, [part])]
    text = preview_html(preview)
    assert '<span class="trained">&lt;b&gt;ok&lt;/b&gt;</span>' in text
    assert '<span class="masked">&lt;user&gt;hi &amp; bye</span>' in text
    assert "1 problem(s): fix them to start a run" in text and "f.json:3: empty output" in text
    assert 'data-tokens="2" data-trained="1"' in text


def test_loss_curve_draws_one_point_per_logged_step():
    progress = Progress(step=3, total=10, train=[(1, 2.0), (2, 1.5), (3, 1.2)], evals=[(2, 1.8)])
    svg = loss_svg(progress)
    assert svg.count('class="train-point"') == 3 and svg.count('class="eval-point"') == 1
    assert "<polyline" in svg and 'data-step="3"' in svg
    assert "appears with the first logged step" in loss_svg(Progress())


def test_status_of_a_failed_run_shows_the_log_tail(tmp_path):
    record = RunRecord(name="x", root=str(tmp_path), status="failed", started_at=1.0)
    html_text = status_html(record, "Traceback\n<oops>")
    assert "Failed" in html_text and "&lt;oops&gt;" in html_text and 'data-status="failed"' in html_text
    assert "Not started:</b> busy" in status_html(None, refused="busy")


# --- loading the adapter into the server ---------------------------------------------------------------
def fake_server(listed_after_load: bool = True, load_status: int = 200, already: bool = False):
    calls: list[tuple[str, dict | None]] = []
    models = [{"id": "base", "parent": None}] + ([{"id": "new", "parent": "base"}] if already else [])

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        calls.append((request.url.path, body))
        assert request.headers["authorization"] == "Bearer k"
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": models})
        if load_status != 200:
            return httpx.Response(load_status, json={"error": {"message": "lora_path escapes the root"}})
        if listed_after_load:
            models.append({"id": body["lora_name"], "parent": "base"})
        return httpx.Response(200, text="ok")

    return calls, httpx.MockTransport(handler)


def publisher(transport) -> AdapterPublisher:
    return AdapterPublisher("http://s:1", "k", wait_s=0.2, poll_s=0.01, transport=transport)


def test_adapter_already_listed_by_the_adapter_dir_is_not_loaded_again():
    calls, transport = fake_server(already=True)
    assert publisher(transport).publish("new", Path("/saves/new")) == "new"
    assert [path for path, _ in calls] == ["/v1/models"]


def test_adapter_is_loaded_through_the_vllm_shaped_endpoint(tmp_path):
    calls, transport = fake_server()
    assert publisher(transport).publish("new", tmp_path / "new") == "new"
    load = [body for path, body in calls if path == "/v1/load_lora_adapter"]
    assert load == [{"lora_name": "new", "lora_path": str(tmp_path / "new")}]


def test_overwritten_adapter_is_reloaded_in_place_or_left_to_the_adapter_directory(tmp_path):
    calls, transport = fake_server(already=True)
    assert publisher(transport).publish("new", tmp_path / "new", replace=True) == "new"
    load = [body for path, body in calls if path == "/v1/load_lora_adapter"]
    assert load == [{"lora_name": "new", "lora_path": str(tmp_path / "new"), "load_inplace": True}]
    # Runtime loading off (404): a server listing it follows its adapter directory, new weights included.
    _, transport = fake_server(already=True, load_status=404)
    assert publisher(transport).publish("new", tmp_path / "new", replace=True) == "new"


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (404, "does not load adapters at run time: start it with --adapter-dir"),
        (403, "refused new \\(403\\): lora_path"),
    ],
)
def test_refusals_say_what_to_do(status, message):
    _, transport = fake_server(load_status=status)
    with pytest.raises(ServeError, match=message):
        publisher(transport).publish("new", Path("/saves/new"))


def test_dropped_files_never_go_into_the_shipped_demo_data(tmp_path):
    from ui.training.handlers import DEMO_DATA, TrainOptions

    options = TrainOptions.for_page([tmp_path / "saves"], [tmp_path / "mine"], tmp_path / "fb", "default")
    assert options.upload_dirs() == [tmp_path / "mine", tmp_path / "fb"]
    assert DEMO_DATA.resolve() in [Path(d).resolve() for d in options.dataset_dirs]  # offered for training
    catalog = DatasetCatalog(options.dataset_dirs)
    drop = tmp_path / "rows.jsonl"
    drop.write_text('{"instruction": "hi", "output": "hello"}\n')
    with pytest.raises(DatasetRefused, match="takes no dropped files"):
        catalog.register_upload(drop, DEMO_DATA, "x", options.upload_dirs())
