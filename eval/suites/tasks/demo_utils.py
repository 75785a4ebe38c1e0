"""Data loaders and scoring for the offline demo suite (lm-eval `!function` hooks; no hub access).

lm-eval calls `load_*` through the task YAMLs' `custom_dataset`; the JSONL files sit in `data/`
beside this module, so the suite works from any working directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str):
    import datasets

    rows = [
        json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_demo_mc(**kwargs):
    """40 four-way general-knowledge questions, `answer` is the index of the right choice."""
    return _load("demo_mc.jsonl")


def load_demo_gen(**kwargs):
    """30 short-answer questions, `answers` lists accepted answers."""
    return _load("demo_gen.jsonl")


def _norm(text: str) -> str:
    return re.sub(r"[^\w\s]", " ", text.lower()).split("\n")[0].strip()


def process_gen(doc: dict, results: list[str]) -> dict:
    """`contains`: an accepted answer occurs in the reply's first line (as words, case-insensitive);
    `exact_match`: the reply's first line is an accepted answer."""
    reply = _norm(results[0])
    answers = [_norm(a) for a in doc["answers"]]
    contains = any(re.search(rf"\b{re.escape(a)}", reply) for a in answers)
    exact = any(" ".join(reply.split()) == " ".join(a.split()) for a in answers)
    return {"contains": float(contains), "exact_match": float(exact)}
