"""`llm-data`: dataset tools. Run as `llm-data {validate,preview,register,...} -h`.

Each subcommand is a module with `add_parser(subparsers) -> ArgumentParser` and `run(args) -> int`
(the exit status). To add one, write the module and append it to SUBCOMMANDS below.
"""

from __future__ import annotations

import argparse
import sys

from serve.cli_runner import run_cli
from train.data import extract_role, preview, register, synth, validate

# The registry: one module per subcommand, in the order `llm-data -h` lists them.
SUBCOMMANDS = [
    validate,
    preview,
    register,
    synth,
    extract_role,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-data", description="Check, register and build training datasets."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library errors (OSError, ValueError) carry the file, row or parameter and what to do.
    return run_cli(f"llm-data {args.command}", lambda: args._run(args), also=(OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
