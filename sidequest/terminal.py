"""Agent and model text made safe to print on a person's terminal.

Why: a task's prompt, progress message, error, result and run-log lines come from agents and models.
Written as they are, an escape sequence in them acts on the user's terminal: `ESC[1A ESC[2K` erases
the line above, OSC 52 writes the clipboard, OSC 8 shows a link under other text. Rich keeps
these bytes in Text and Table cells, so every human (non `--json`) output of such text goes through
`printable`. `--json` output is left exact: JSON escapes control characters itself.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""C0 controls except tab and newline, DEL, and the C1 controls (U+0080–U+009F)."""

_NAMED = {"\x1b": "␛", "\r": "\\r", "\x07": "\\a", "\x08": "\\b"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\x{ord(char):02x}"


def printable(text: str) -> str:
    """`text` with every control character but `\\n` and `\\t` shown as a visible stand-in
    (ESC as `␛`, the others escaped like `\\x07`), so it can only ever print as characters."""
    return _CONTROL.sub(_visible, text)


__all__ = ["printable"]
