"""How the command line reports a mistake: a suggestion for a mistyped choice, and, under `--json`,
every error as one JSON object on stderr (`{"error": {"code": ..., "message": ...}}`).

Why JSON errors: a script that asked for `--json` parses what it gets; a usage line or a
`sidequest: …` sentence on stderr would be the one output it cannot read. Exit codes stay as they
are (1 failed, 2 usage, 130 interrupted), and stdout stays empty on error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pydantic import BaseModel

from sidequest.suggest import did_you_mean

EXIT_USAGE = 2


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorDocument(BaseModel):
    """What `--json` writes on stderr for any error."""

    error: ErrorBody


def json_error(code: str, message: str) -> str:
    """One line, so a reader can take stderr's last line whatever was logged before it."""
    return ErrorDocument(error=ErrorBody(code=code, message=message)).model_dump_json()


def report(message: str, *, code: str, as_json: bool) -> None:
    """The CLI's one way to print an error: `sidequest: <message>` on one line, or the JSON object."""
    sys.stdout.flush()
    line = " ".join(message.split())  # one line, whatever the message holds
    text = json_error(code, line) if as_json else f"sidequest: {line}"
    print(text, file=sys.stderr, flush=True)


def wants_json(argv: Sequence[str]) -> bool:
    """`--json` anywhere before a `--`: known before parsing, so a usage error can be shaped by it."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


class CliParser(argparse.ArgumentParser):
    """argparse with a suggestion for a mistyped choice (`sumbit` → 'submit') and JSON usage errors.

    Subcommand parsers are made with the same class (argparse's default), so each level behaves
    alike; `json_errors` is set on a class made per run (`parser_class`), never on this one.
    """

    json_errors: bool = False

    @classmethod
    def for_run(cls, argv: Sequence[str]) -> type[CliParser]:
        return type(cls.__name__, (cls,), {"json_errors": wants_json(argv)})

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse's own check, with the close choice named; it has no hook for this before 3.14.
        choices = action.choices
        if choices is not None and value not in choices:
            names = [str(c) for c in choices]
            hint = did_you_mean(str(value), names)
            raise argparse.ArgumentError(
                action,
                f"invalid choice: {value!r}{'; ' + hint if hint else ''} (choose from {', '.join(names)})",
            )
        super()._check_value(action, value)

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        report(f"{self.prog}: {message}", code="usage", as_json=True)
        sys.exit(EXIT_USAGE)


__all__ = ["CliParser", "ErrorDocument", "json_error", "report", "wants_json"]
