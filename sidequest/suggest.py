"""Close-match suggestions for names a person typed ("did you mean 'research'?").

One helper for every surface that refuses a name (agents in the engine, so the MCP tools, REST and
the CLI say the same; CLI subcommands; MCP tool names), so the cut-off and the wording agree.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

CUTOFF = 0.6
"""difflib's default: 'reserch' finds 'research', 'nope' finds nothing among unrelated names."""


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The nearest names first; a case-only difference ('Research') counts as the closest."""
    names = sorted(set(choices))
    folded = {name.lower(): name for name in names}
    if word.lower() in folded and folded[word.lower()] != word:
        return [folded[word.lower()]]
    return difflib.get_close_matches(word, names, n=n, cutoff=CUTOFF)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`"did you mean 'research'?"`, or '' when nothing is close: a wrong guess is worse than none."""
    matches = close_matches(word, choices)
    if not matches:
        return ""
    return "did you mean " + " or ".join(repr(m) for m in matches) + "?"


__all__ = ["close_matches", "did_you_mean"]
