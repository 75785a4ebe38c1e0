"""What every console script shares: user errors as one line on stderr and an exit status.

Library code raises; only a CLI's `main` turns an exception into a message and an exit code, and each
does it here so `llm-serve`, `llm-models`, `llm-data`, `llm-train`, `llm-export`, `llm-eval` and
`llm-ui` answer the same way:

    def main(argv=None) -> int:
        return run_cli("llm-x", lambda: _main(argv))

A `UserError` (a setting, file, flag or input the user can fix; the message names it and says what to
do) prints `PROG: error: MESSAGE` and exits with its `exit_code` (2 unless a CLI documents otherwise);
Ctrl-C exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; the message names the file, flag or key and what to do."""

    exit_code = 2


def run_cli(
    prog: str,
    body: Callable[[], int | None],
    *,
    also: tuple[type[BaseException], ...] = (),
    also_exit: int = 2,
) -> int:
    """Run a CLI's body; user errors become one message on stderr and their exit status.

    `also` names further exception types the CLI treats as the user's (e.g. OSError for a file that
    cannot be read), reported the same way with status `also_exit`.
    """
    try:
        return int(body() or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except also as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return also_exit
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
