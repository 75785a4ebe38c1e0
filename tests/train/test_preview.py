"""`llm-data preview`: rows rendered token for token as LLaMA-Factory's trainer builds them, label masks shown.

The fast tests cover span grouping, the terminal format and the errors; the slow ones render real
datasets (every format and stage) and compare with what LLaMA-Factory's own `get_dataset` gives the
trainer for the same config, as `llm-train` resolves it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from train.data.cli import main as llm_data
from train.data.preview import (
    LF_STAGES,
    PARTS,
    Preview,
    PreviewError,
    PreviewRow,
    Rendered,
    Span,
    format_preview,
    resolve_source,
    spans,
)

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "configs" / "data" / "demo"


class CharTokenizer:
    """One character per token id (its code point), enough to check how spans are cut."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_spans_group_masked_and_trained_runs_and_show_label_tokens():
    ids = [ord(c) for c in "Q:hi A:yo!"]
    labels = [-100] * 7 + [ord("y"), ord("o"), ord("!")]
    assert spans(CharTokenizer(), ids, labels) == [Span("Q:hi A:", False), Span("yo!", True)]
    # A trained position whose label differs from its input shows what the loss asks for.
    assert spans(CharTokenizer(), [ord("a"), ord("b")], [-100, ord("Z")]) == [
        Span("a", False),
        Span("Z", True),
    ]
    assert spans(CharTokenizer(), [], []) == []


def test_format_marks_trained_text_counts_tokens_and_says_when_cut():
    part = Rendered("input", [1, 2, 3, 4], [-100, -100, 3, 4], 9, [Span("<u>hi", False), Span("yo", True)])
    preview = Preview(
        "d.json", "d", "alpaca", "sft", "smollm2", None, 4, 2, 1, problems=["d.json:2: empty output"]
    )
    preview.rows = [PreviewRow(1, [part])]
    text = format_preview(preview)
    assert text.splitlines()[0] == "d.json:2: empty output"
    assert "1 of 2 rows valid" in text and "template smollm2, cutoff_len 4" in text
    assert "── row 1 · input: 4 tokens, 2 carry the loss (cut from 9 to cutoff_len 4)" in text
    assert "<u>hi⟦yo⟧" in text
    assert "\x1b[1;32myo\x1b[0m" in format_preview(preview, color=True)
    assert "label_ids: [-100, -100, 3, 4]" in format_preview(preview, ids=True)


def test_unknown_source_names_what_is_registered():
    with pytest.raises(PreviewError, match="registered: huangdi_demo"):
        resolve_source("nope", DEMO_DIR)
    with pytest.raises(PreviewError, match="no such file; .*--dataset-dir"):
        resolve_source("nope.json", None)
    name, entry, path = resolve_source("huangdi_demo", DEMO_DIR)
    assert (
        name == "huangdi_demo"
        and path == DEMO_DIR / "huangdi_demo.json"
        and entry.columns["system"] == "system"
    )


def test_broken_file_prints_row_errors_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": ""}\n{"instruction": 3, "output": "x"}\nnot json\n')
    assert llm_data(["preview", str(bad), "--no-color"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:1: empty output" in out
    assert f"{bad}:2: instruction (column 'instruction') must be a string, got int" in out
    assert f"{bad}:3:1: bad JSON" in out
    assert "0 of 3 rows valid" in out


def test_missing_dataset_is_exit_2(capsys):
    assert llm_data(["preview", "nope", "--dataset-dir", str(DEMO_DIR)]) == 2
    assert "registered: huangdi_demo" in capsys.readouterr().err


# --- against LLaMA-Factory's own preprocessing (real tokenizer and LLaMA-Factory) ----------------------


def trainer_dataset(cfg, rows: int, tokenizer_module: dict):
    """The train split LLaMA-Factory's workflow builds from llm-train's resolved arguments."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import get_train_args

    from train.run import Options, plan_run

    plan = plan_run(cfg, Options(dry_run=True), ["llm-train"])
    model_args, data_args, training_args, _, _ = get_train_args({**plan.lf_args, "max_samples": rows})
    # A trainer process starts with a fresh tokenizer and template registry; give each case the same.
    module = copy.deepcopy(tokenizer_module)
    saved = copy.deepcopy(TEMPLATES[data_args.template])
    try:
        template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
        data = get_dataset(template, model_args, data_args, training_args, LF_STAGES[cfg.stage], **module)
    finally:
        TEMPLATES[data_args.template] = saved
    return data["train_dataset"]


@pytest.fixture(scope="module")
def previewer(default_model):
    from train.data.preview import Previewer

    return Previewer("default")


@pytest.mark.slow
def test_preview_equals_llamafactory_preprocessing(previewer, shared_demo_data, tmp_path):
    """Every stage the Train tab offers, and sharegpt with tool calls: same ids, same labels."""
    from llamafactory.hparams import ModelArguments
    from llamafactory.model import load_tokenizer

    from train.config import TrainConfig

    tokenizer_module = load_tokenizer(ModelArguments(model_name_or_path=str(previewer.model_path)))
    cases = [
        ("huangdi_demo", DEMO_DIR, "sft", 48),  # persona layout (system/input/output), cut short
        ("glaive_toolcall_en_demo", shared_demo_data, "sft", 1024),  # sharegpt, tools, multi-turn
        ("dpo_en_demo", shared_demo_data, "dpo", 256),
        ("kto_en_demo", shared_demo_data, "kto", 256),
    ]
    rows = 2
    for dataset, dataset_dir, stage, cutoff_len in cases:
        cfg = TrainConfig(
            dataset=dataset,
            dataset_dir=str(dataset_dir),
            stage=stage,
            cutoff_len=cutoff_len,
            output_dir=str(tmp_path / "out"),
        )
        name, entry, file = resolve_source(dataset, dataset_dir)
        preview = previewer.preview(cfg, file, entry, rows=rows, name=name)
        assert preview.ok, preview.problems
        assert preview.template == "smollm2" and [r.row for r in preview.rows] == [1, 2]

        trained = trainer_dataset(cfg, rows, tokenizer_module)
        assert len(trained) == rows
        for row, example in zip(preview.rows, trained, strict=True):
            for part, (_, ids_key, labels_key) in zip(row.parts, PARTS[LF_STAGES[stage]], strict=True):
                assert part.input_ids == example[ids_key], (dataset, row.row, part.part)
                assert part.labels == example[labels_key], (dataset, row.row, part.part)
                assert part.tokens <= cutoff_len and part.trained > 0
            if stage == "kto":
                assert row.kto_label == example["kto_tags"]
        if dataset == "huangdi_demo":  # the response is cut by cutoff_len, and the preview says so
            first = preview.rows[0].parts[0]
            assert first.truncated and first.full_length > 48
            assert "用四郎的口吻回答问题" in "".join(s.text for s in first.spans if not s.trained)
        if dataset == "glaive_toolcall_en_demo":  # the end of every assistant turn carries the loss
            trained_text = [s.text for s in preview.rows[0].parts[0].spans if s.trained]
            assert len(trained_text) >= 2 and all(t.endswith("<|im_end|>\n") for t in trained_text)


@pytest.mark.slow
def test_stage_and_template_mismatches_are_problems(previewer, shared_demo_data, capsys):
    from train.config import TrainConfig

    args = ["preview", "kto_en_demo", "--dataset-dir", str(shared_demo_data), "--rows", "1", "--json"]
    assert llm_data(args) == 1  # KTO data under the default stage, sft
    data = json.loads(capsys.readouterr().out)
    file = shared_demo_data / "kto_en_demo.json"
    assert not data["ok"] and data["problems"][0] == (
        f"{file}: KTO data (a label column, columns.kto_tag) needs stage kto, not sft"
    )

    name, entry, file = resolve_source("identity", shared_demo_data)
    cfg = TrainConfig(dataset=name, dataset_dir=str(shared_demo_data), template="llama3", output_dir="o")
    preview = previewer.preview(cfg, file, entry, rows=1, name=name)
    assert preview.problems and preview.problems[0].startswith("template: template 'llama3'")
    assert preview.rows and preview.template == "llama3"  # still shown as llama3 would render it
