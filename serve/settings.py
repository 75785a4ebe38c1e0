"""The one settings loader: defaults < `--config YAML` < command-line flags, validated into a typed config.

Every CLI with a `--config` (llm-serve, llm-eval, llm-ui) loads through `load_settings`; `llm-train`
reads LLaMA-Factory YAML through `read_yaml_mapping` and `describe_validation_error` so its messages
have the same shape. A problem is one line naming where the value came from (the YAML file or the
`--flag`), the key, and what to do, e.g.

    invalid setting in eval.yaml: unknown key 'limitt' (did you mean 'limit'?); llm-eval --help lists the settings

Config classes use `extra="forbid"`, so a misspelt key is an error, never silently ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from serve.cli_runner import UserError

M = TypeVar("M", bound=BaseModel)


class SettingsError(UserError, ValueError):
    """A setting is invalid; the message names the file or flag, the key and what to do."""


def read_yaml_mapping(path: str | Path, error: type[Exception] = SettingsError, hint: str = "") -> dict:
    """The mapping in YAML file `path` ({} for an empty file); raises `error` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"config file {p} does not exist{hint}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise error(f"{p}: not valid YAML{line}: {getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{p}: expected a mapping of settings (key: value), got {type(data).__name__}")
    return data


def load_settings(
    cls: type[M],
    path: str | Path | None,
    overrides: dict[str, Any],
    *,
    error: type[Exception] = SettingsError,
    prog: str | None = None,
) -> M:
    """Defaults < YAML at `path` < `overrides` (flag values; None means "not given"), validated into `cls`.

    YAML keys may use `-` or `_`. Raises `error` with one line naming the file or flag and the key.
    """
    data: dict[str, Any] = {}
    if path:
        data = {str(k).replace("-", "_"): v for k, v in read_yaml_mapping(path, error).items()}
    flags = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls.model_validate(data | flags)
    except ValidationError as exc:
        raise error(describe_validation_error(exc, cls, path=path, flags=flags, prog=prog)) from exc


def describe_validation_error(
    exc: ValidationError,
    cls: type[BaseModel],
    *,
    path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    prog: str | None = None,
) -> str:
    """One line: `invalid setting in FILE: key: problem; --flag: problem`, naming where each value came from."""
    flags = flags or {}
    from_file, from_flags = [], []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        top = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(top, list(cls.model_fields), n=1)
            text = f"unknown key {top!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            if prog:
                text += f"; {prog} --help lists the settings"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            text = f"{key}: {msg}" if key else msg
        if top in flags:
            from_flags.append(f"--{top.replace('_', '-')}: {text}")
        else:
            from_file.append(text)
    parts = []
    if from_file:
        parts.append(f"invalid setting{f' in {path}' if path else ''}: " + "; ".join(from_file))
    parts += [f"invalid setting {text}" for text in from_flags]
    return "; ".join(parts).replace("\n", " ")
