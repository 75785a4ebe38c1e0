"""The datasets the Train tab offers: every entry of a `dataset_info.json` in the configured directories.

Those are the project's demo data, the feedback datasets the chat page writes and any directory given
with `--dataset-dir` (where `llm-data register` puts entries). A file dropped on the page is validated
and, only when every row is valid, copied into one of those directories and registered there.
Entries whose file lies outside their directory (after symlinks) are not offered: the page reads and
trains only on files under the directories it was given.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from serve.artifacts.dataset_registry import DatasetEntry, DatasetInfoError, load_dataset_info
from train.data.readers import SUFFIXES
from train.data.validate import Report, validate_file

SAFE_FILE = re.compile(r"[^A-Za-z0-9._-]+")


class DatasetRefused(ValueError):
    """A dataset or file the page will not use; the message says why and what to do."""


@dataclass(frozen=True)
class DatasetChoice:
    name: str
    dataset_dir: Path
    file: Path
    entry: DatasetEntry
    kind: str  # the stage it fits: sft, dpo, kto or pt

    @property
    def key(self) -> str:
        return f"{self.name}@{self.dataset_dir}"

    @property
    def label(self) -> str:
        return f"{self.name} · {self.kind} · {self.dataset_dir.name or self.dataset_dir}"


def kind_of(entry: DatasetEntry) -> str:
    if entry.ranking:
        return "dpo"
    if entry.column("kto_tag"):
        return "kto"
    if entry.column("response") is None and entry.column("prompt") and entry.formatting == "alpaca":
        return "pt"
    return "sft"


def inside(path: Path, root: Path) -> bool:
    """Whether `path` resolves (symlinks followed) to `root` or below it."""
    return path.resolve().is_relative_to(root.resolve())


class DatasetCatalog:
    """The registered datasets of a list of directories, and the place dropped files are registered."""

    def __init__(self, dirs: list[Path]):
        self.dirs = list(dict.fromkeys(Path(d).expanduser().resolve() for d in dirs))

    def scan(self) -> tuple[list[DatasetChoice], list[str]]:
        """Every usable entry, and a note for each directory or entry that cannot be used."""
        choices: list[DatasetChoice] = []
        notes: list[str] = []
        for directory in self.dirs:
            try:
                info = load_dataset_info(directory)
            except DatasetInfoError as exc:
                notes.append(str(exc))
                continue
            for name, raw in info.items():
                if not isinstance(raw, dict) or not raw.get("file_name"):
                    continue  # hub datasets: not used offline
                entry = DatasetEntry.from_info(raw)
                file = directory / entry.file_name
                if not inside(file, directory):
                    notes.append(
                        f"{name} in {directory}: its file {entry.file_name} lies outside the directory"
                    )
                    continue
                choices.append(DatasetChoice(name, directory, file, entry, kind_of(entry)))
        return choices, notes

    def get(self, key: str) -> DatasetChoice:
        for choice in self.scan()[0]:
            if choice.key == key:
                return choice
        raise DatasetRefused(
            f"dataset {key!r} is not registered in the page's dataset directories; pick one from the list"
        )

    def directory(self, value: str | Path) -> Path:
        """One of the configured directories; anything else is refused."""
        path = Path(value).expanduser().resolve()
        if path not in self.dirs:
            raise DatasetRefused(
                f"{value} is not one of the page's dataset directories ({', '.join(map(str, self.dirs))})"
            )
        return path

    def check_upload(self, upload: Path) -> Report:
        """Every row of a dropped file, checked as `llm-data validate` does (nothing is written)."""
        if upload.suffix.lower() not in SUFFIXES:
            raise DatasetRefused(f"{upload.name}: unsupported file type; use {', '.join(SUFFIXES)}")
        return validate_file(upload)

    def register_upload(
        self, upload: Path, dest: str | Path, name: str, allowed: list[Path] | None = None
    ) -> DatasetChoice:
        """Copy a valid dropped file into `dest` (a configured directory) and register it as `name`."""
        from train.data.register import RegisterError, register_dataset

        directory = self.directory(dest)
        if allowed is not None and directory not in allowed:
            raise DatasetRefused(
                f"{directory} takes no dropped files; choose one of {', '.join(map(str, allowed))}"
            )
        name = (name or "").strip() or upload.stem
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise DatasetRefused(f"dataset name {name!r}: use letters, digits, '.', '_' or '-'")
        if name in load_dataset_info(directory):
            raise DatasetRefused(
                f"a dataset named {name!r} is already registered in {directory}; choose another name"
            )
        report = self.check_upload(upload)
        if not report.ok:
            raise DatasetRefused(
                f"{upload.name} has {len(report.problems)} problems; fix them and drop it again"
            )
        target = directory / SAFE_FILE.sub("_", upload.name)
        if target.exists():
            raise DatasetRefused(f"{target} already exists; rename the file before dropping it")
        directory.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        shutil.copyfile(upload, tmp)
        os.replace(tmp, target)
        try:
            entry, _ = register_dataset(target, name, directory)
        except (RegisterError, DatasetInfoError) as exc:
            target.unlink(missing_ok=True)  # nothing half-registered is left behind
            raise DatasetRefused(str(exc)) from exc
        return DatasetChoice(name, directory, target, entry, kind_of(entry))
