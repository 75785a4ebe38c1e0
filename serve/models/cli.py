"""`llm-models`: list, locate and bootstrap the models this machine can serve, and the adapters in saves/.

Run as:
    llm-models list [--saves DIR] [--json]   # default model, cached conversions, adapters
    llm-models path default|PATH             # local checkpoint directory (converts on first use)
    llm-models pull default|PATH             # convert now (the default model or a .gguf file)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serve.artifacts.model_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from serve.artifacts.run_manifest import read_manifest
from serve.cli_runner import run_cli
from serve.models.registry import (
    DEFAULT_SERVED_ID,
    default_checkpoint_dir,
    is_checkpoint_dir,
    models_dir,
    resolve_model,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-models", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="default model, cached models and adapters under --saves")
    ls.add_argument("--saves", default="saves", help="directory searched for adapters (default: saves)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (("path", "print the local checkpoint directory"), ("pull", "bootstrap/convert now")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument(
            "model", nargs="?", default="default", help="`default`, a checkpoint dir or a .gguf file"
        )
    return p


def list_models(saves: Path) -> dict:
    """What `llm-models list` shows, as data."""
    default_dir = default_checkpoint_dir()
    cached = []
    if models_dir().is_dir():
        cached = [
            {"path": str(d), "size_mb": round(sum(f.stat().st_size for f in d.iterdir()) / 2**20, 1)}
            for d in sorted(models_dir().iterdir())
            if d.is_dir() and not d.name.startswith(".") and is_checkpoint_dir(d)
        ]
    adapters = []
    if saves.is_dir():
        for cfg in sorted(saves.rglob(ADAPTER_CONFIG)):
            if any(part.startswith(".") for part in cfg.relative_to(saves).parts):
                continue  # partial or staging directories
            folder = cfg.parent
            info = read_adapter_config(folder)
            manifest = read_manifest(folder)
            adapters.append(
                {
                    "name": folder.name,
                    "path": str(folder),
                    "base_model": info.base_model or None,
                    "rank": info.rank,
                    "stage": manifest.stage if manifest else None,
                    "servable": (folder / ADAPTER_WEIGHTS).is_file(),
                }
            )
    return {
        "default": {
            "id": DEFAULT_SERVED_ID,
            "path": str(default_dir),
            "bootstrapped": is_checkpoint_dir(default_dir),
        },
        "cached": cached,
        "adapters": adapters,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("llm-models", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.command == "list":
        data = list_models(Path(args.saves))
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        d = data["default"]
        state = "ready" if d["bootstrapped"] else "not converted yet (llm-models pull default)"
        print(f"default  {d['id']}  {d['path']}  [{state}]")
        for m in data["cached"]:
            print(f"cached   {m['path']}  {m['size_mb']} MB")
        for a in data["adapters"]:
            flag = "" if a["servable"] else "  [no adapter_model.safetensors]"
            print(f"adapter  {a['name']}  {a['path']}  base={a['base_model']} r={a['rank']}{flag}")
        if not data["adapters"]:
            print(f"(no adapters under {args.saves}/; train one with llm-train)")
        return 0
    print(resolve_model(args.model).path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
