"""`llm-data preview DATASET_OR_FILE`: the first rows exactly as the trainer will see them, label masks shown.

Run as `llm-data preview huangdi_demo --dataset-dir configs/data/demo [--template T] [--rows N]` or
`llm-data preview my.jsonl --stage dpo`. Every row is validated first (problems print as `FILE:ROW:
reason`, exit status 1); the first valid rows then go through LLaMA-Factory's own code as `llm-train`
sets it up: the dataset converter of the dataset_info.json entry, the chat template llm-train picks
(or `--template`), and the stage's dataset processor (cut to cutoff_len, label mask). Text that carries
the loss is highlighted (between ⟦ ⟧ without colour): LLaMA-Factory's `inputs`/`labels` print, in one view.
The chat page's Train tab shows the same `Preview`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.artifacts.dataset_registry import DatasetEntry, find_entry, load_dataset_info
from train.config import TrainConfig
from train.data.readers import read_rows
from train.data.validate import validate_file

IGNORE_INDEX = -100  # LLaMA-Factory's label for "no loss on this token"
# Our stage names -> the dataset stage LLaMA-Factory's workflows pass to get_dataset (dpo reads pairs as rm).
LF_STAGES = {"sft": "sft", "pt": "pt", "dpo": "rm", "rm": "rm", "kto": "kto"}
# The processor's output columns for each sequence of a row: (part, input ids, labels or None = all).
PARTS = {
    "sft": [("input", "input_ids", "labels")],
    "kto": [("input", "input_ids", "labels")],
    "pt": [("text", "input_ids", None)],
    "rm": [
        ("chosen", "chosen_input_ids", "chosen_labels"),
        ("rejected", "rejected_input_ids", "rejected_labels"),
    ],
}


class PreviewError(ValueError):
    """The dataset or file to preview cannot be found; the message says what exists."""


@dataclass(frozen=True)
class Span:
    """A run of tokens that all carry the loss (`trained`) or all do not, decoded to text."""

    text: str
    trained: bool


@dataclass
class Rendered:
    """One token sequence the trainer gets for a row: ids, labels (-100: no loss) and its text spans."""

    part: str  # "input" (sft, kto), "text" (pt), "chosen" or "rejected" (dpo)
    input_ids: list[int]
    labels: list[int]
    full_length: int  # before cutting to cutoff_len
    spans: list[Span]

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def truncated(self) -> bool:
        return self.full_length > self.tokens


@dataclass
class PreviewRow:
    row: int  # the row number `llm-data validate` uses (line number for .jsonl)
    parts: list[Rendered]
    kto_label: bool | None = None


@dataclass
class Preview:
    """What one dataset looks like to the trainer: the first rows rendered, and every problem found."""

    file: str
    dataset: str | None
    format: str
    stage: str
    template: str | None
    default_system: str | None
    cutoff_len: int
    total_rows: int
    valid_rows: int
    packed: bool = False  # the trainer concatenates rows into blocks of cutoff_len (pt, or packing: true)
    rows: list[PreviewRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data


def resolve_source(
    source: str, dataset_dir: str | Path | None
) -> tuple[str | None, DatasetEntry | None, Path]:
    """A dataset name registered in `dataset_dir`, else a file path: (name, entry, file)."""
    if dataset_dir is not None and source in load_dataset_info(dataset_dir):
        entry, path = find_entry(dataset_dir, source)
        return source, entry, path
    path = Path(source).expanduser()
    if path.is_file():
        return None, None, path
    if dataset_dir is None:
        raise PreviewError(f"{source}: no such file; to preview a registered dataset, add --dataset-dir DIR")
    known = ", ".join(sorted(load_dataset_info(dataset_dir))) or "none"
    raise PreviewError(
        f"{source!r} is neither a file nor a dataset in {Path(dataset_dir) / 'dataset_info.json'} "
        f"(registered: {known})"
    )


class Previewer:
    """Renders previews for one base model; keeps its tokenizer between calls (the chat page previews often)."""

    def __init__(self, model: str = "default"):
        self.model = model
        self._model_path: Path | None = None
        self._tokenizer: Any = None

    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            from serve.models import resolve_model

            self._model_path = resolve_model(self.model).path
        return self._model_path

    def tokenizer(self) -> Any:
        """The tokenizer as LLaMA-Factory's trainer loads it (`load_tokenizer`: right padding, patched)."""
        if self._tokenizer is None:
            _quiet_llamafactory()
            from llamafactory.hparams import ModelArguments
            from llamafactory.model import load_tokenizer

            self._tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(self.model_path)))[
                "tokenizer"
            ]
        return self._tokenizer

    def preview(
        self,
        cfg: TrainConfig,
        file: Path,
        entry: DatasetEntry | None = None,
        *,
        rows: int = 5,
        name: str | None = None,
    ) -> Preview:
        """Validate every row of `file` (read as `entry`, else detected) and render the first `rows` valid ones."""
        from train.run import stage_mismatch

        _quiet_llamafactory()
        report = validate_file(file, entry=entry, stage=cfg.stage)
        preview = Preview(
            file=str(file),
            dataset=name,
            format=report.format,
            stage=cfg.stage,
            template=cfg.template,
            default_system=cfg.default_system,
            cutoff_len=cfg.cutoff_len,
            total_rows=report.counts()["rows"],
            valid_rows=len(report.samples),
            problems=[str(p) for p in report.problems],
        )
        if report.entry is not None and (why := stage_mismatch(report.entry, cfg.stage)):
            preview.problems.insert(0, f"{file}: {why}")
        if not report.samples or report.entry is None:
            return preview
        data_args, template_problem = self._data_args(cfg, report.samples[0][1])
        if template_problem:
            preview.problems.insert(0, template_problem)
        if data_args is None:
            return preview
        preview.template, preview.default_system = data_args.template, data_args.default_system
        # Packing joins rows into cutoff_len blocks; each row is shown on its own, masked as in its block.
        preview.packed = bool(data_args.packing if data_args.packing is not None else cfg.stage == "pt")
        data_args = dataclasses.replace(data_args, packing=False)
        wanted = [number for number, _ in report.samples[: max(0, rows)]]
        preview.rows = self._render(file, report.entry, data_args, cfg.stage, wanted, preview.problems)
        return preview

    def _data_args(self, cfg: TrainConfig, first: Any) -> tuple[Any, str | None]:
        """LLaMA-Factory's DataArguments as llm-train builds them, and a template problem if any."""
        from llamafactory.hparams import DataArguments

        from train.launch import llamafactory_args
        from train.run import resolve_template
        from train.template import TemplateMismatchError

        chats = [first.conversation()] if first.text is None else []
        problem = None
        try:
            template = resolve_template(cfg, self.model_path, chats, False, tokenizer=self.tokenizer())
        except TemplateMismatchError as exc:
            problem = f"template: {exc}"
            if cfg.template is None:
                return None, problem
            template = {"name": cfg.template, "default_system": cfg.default_system}
        lf_args = llamafactory_args(
            cfg,
            model_path=self.model_path,
            output_dir=Path("."),
            dataset_dir=Path(cfg.dataset_dir),
            template=template["name"],
            default_system=template.get("default_system"),
            cpu=True,
            estimated_steps=1,
        )
        known = {f.name for f in dataclasses.fields(DataArguments)}
        try:
            return DataArguments(**{k: v for k, v in lf_args.items() if k in known}), problem
        except (
            ValueError
        ) as exc:  # LLaMA-Factory's own consistency checks (e.g. mask_history + train_on_prompt)
            return None, f"config: {exc}"

    def _render(
        self,
        file: Path,
        entry: DatasetEntry,
        data_args: Any,
        stage: str,
        wanted: list[int],
        problems: list[str],
    ) -> list[PreviewRow]:
        from llamafactory.data.converter import get_dataset_converter
        from llamafactory.data.loader import _get_dataset_processor
        from llamafactory.data.parser import get_dataset_list

        from train.template import fixed_template

        lf_stage = LF_STAGES[stage]
        template, tok = fixed_template(self.tokenizer(), data_args)
        attr = get_dataset_list(["preview"], {"preview": entry.to_info()})[0]
        convert = get_dataset_converter(attr.formatting, attr, data_args)
        uncut_args = dataclasses.replace(data_args, cutoff_len=1 << 30)
        cut = _get_dataset_processor(data_args, lf_stage, template, tok, None)
        uncut = _get_dataset_processor(uncut_args, lf_stage, template, tok, None)
        raw = read_rows(file).rows
        columns = list(dict.fromkeys(key for _, row in raw for key in row))
        by_number = dict(raw)
        out: list[PreviewRow] = []
        for number in wanted:
            # As `datasets` loads a file: every column present in every row (None where a row lacks it).
            example = {key: by_number[number].get(key) for key in columns}
            batch = {key: [value] for key, value in convert(example).items()}
            model_inputs, full_inputs = cut.preprocess_dataset(batch), uncut.preprocess_dataset(batch)
            if not model_inputs.get(PARTS[lf_stage][0][1]):
                problems.append(
                    f"{file}:{number}: LLaMA-Factory drops this row for stage {stage} (the prompt must alternate "
                    "user/assistant turns ending with the user, with one response, or a pair for dpo)"
                )
                continue
            parts = []
            for part, ids_key, labels_key in PARTS[lf_stage]:
                ids = list(model_inputs[ids_key][0])
                labels = list(model_inputs[labels_key][0]) if labels_key else list(ids)  # pt: every token
                parts.append(
                    Rendered(part, ids, labels, len(full_inputs[ids_key][0]), spans(tok, ids, labels))
                )
            tags = model_inputs.get("kto_tags")
            out.append(PreviewRow(number, parts, kto_label=bool(tags[0]) if tags else None))
        return out


def _quiet_llamafactory() -> None:
    """LLaMA-Factory logs template fixes and dropped rows to stdout; the preview reports them itself."""
    import logging
    import os

    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "ERROR")  # read when its logger is first configured
    logging.getLogger("llamafactory").setLevel(logging.ERROR)


def spans(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[Span]:
    """Group tokens into runs that carry the loss or not; a trained run shows its label tokens."""
    result: list[Span] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        trained = labels[start] != IGNORE_INDEX
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != trained:
            ids = labels[start:i] if trained else input_ids[start:i]
            result.append(Span(tokenizer.decode(ids, skip_special_tokens=False), trained))
            start = i
    return result


def preview_config(
    source_name: str | None,
    file: Path,
    dataset_dir: Path | None,
    stage: str,
    template: str | None,
    cutoff_len: int,
) -> TrainConfig:
    """The TrainConfig a CLI preview stands for (what a config with this dataset would train on)."""
    return TrainConfig(
        dataset=source_name or file.stem,
        dataset_dir=str(dataset_dir or file.parent),
        stage=stage,
        template=template,
        cutoff_len=cutoff_len,
        output_dir="preview",
    )


GREEN, DIM, RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def format_preview(preview: Preview, *, color: bool = False, ids: bool = False, max_errors: int = 50) -> str:
    """The preview as a terminal shows it: problems, a header, then each row with its trained text marked."""
    lines = preview.problems[:max_errors]
    if len(preview.problems) > max_errors:
        lines.append(f"... and {len(preview.problems) - max_errors} more problems")
    name = f"dataset {preview.dataset}, " if preview.dataset else ""
    lines.append(
        f"{preview.file}: {name}format {preview.format}, {preview.valid_rows} of {preview.total_rows} rows valid; "
        f"stage {preview.stage}, template {preview.template or '?'}, cutoff_len {preview.cutoff_len}"
    )
    if preview.packed:
        lines.append(
            f"the trainer packs rows into blocks of {preview.cutoff_len} tokens; each row is shown alone"
        )
    if preview.rows:
        how = f"{GREEN}highlighted{RESET}" if color else "between ⟦ ⟧"
        lines.append(f"text {how} carries the loss (labels); the rest is masked ({IGNORE_INDEX})")
    for row in preview.rows:
        for part in row.parts:
            label = "" if row.kto_label is None else (" · desirable" if row.kto_label else " · undesirable")
            cut = (
                f" (cut from {part.full_length} to cutoff_len {preview.cutoff_len})" if part.truncated else ""
            )
            lines.append(
                f"── row {row.row} · {part.part}: {part.tokens} tokens, {part.trained} carry the loss{label}{cut}"
            )
            text = "".join(_marked(s, color) for s in part.spans)
            lines.append(text)
            if ids:
                lines.append(f"input_ids: {part.input_ids}")
                lines.append(f"label_ids: {part.labels}")
    return "\n".join(lines)


def _marked(span: Span, color: bool) -> str:
    if color:
        return f"{GREEN}{span.text}{RESET}" if span.trained else f"{DIM}{span.text}{RESET}"
    return f"⟦{span.text}⟧" if span.trained else span.text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preview", help="show rows as the trainer sees them (chat template, label mask)", description=__doc__
    )
    p.add_argument(
        "source", metavar="DATASET_OR_FILE", help="a dataset name in DIR/dataset_info.json, or a file"
    )
    p.add_argument(
        "--dataset-dir", help="directory holding dataset_info.json (a training config's dataset_dir)"
    )
    p.add_argument(
        "--template", help="LLaMA-Factory template (default: the one llm-train picks for the model)"
    )
    p.add_argument("--stage", default="sft", choices=list(LF_STAGES), help="training stage (default: sft)")
    p.add_argument("--rows", type=int, default=3, help="rows to render (default: 3)")
    p.add_argument(
        "--cutoff-len", type=int, default=1024, help="cut sequences to this many tokens (default: 1024)"
    )
    p.add_argument("--model", default="default", help="base model whose tokenizer renders the rows")
    p.add_argument("--ids", action="store_true", help="also print input_ids and label_ids")
    p.add_argument("--json", action="store_true", help="print the preview as JSON")
    p.add_argument("--no-color", action="store_true", help="mark trained text with ⟦ ⟧ even on a terminal")
    p.add_argument("--max-errors", type=int, default=50, help="print at most this many problems")
    return p


def run(args: argparse.Namespace) -> int:
    name, entry, file = resolve_source(args.source, args.dataset_dir)
    dataset_dir = Path(args.dataset_dir) if name else None
    cfg = preview_config(name, file, dataset_dir, args.stage, args.template, args.cutoff_len)
    preview = Previewer(args.model).preview(cfg, file, entry, rows=args.rows, name=name)
    if args.json:
        print(json.dumps(preview.to_json(), ensure_ascii=False, indent=2))
    else:
        color = sys.stdout.isatty() and not args.no_color
        print(format_preview(preview, color=color, ids=args.ids, max_errors=args.max_errors))
    return 0 if preview.ok else 1
