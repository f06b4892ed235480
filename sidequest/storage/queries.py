"""Named SQL blocks: `-- name --`, a one-line description, then the statement.

SQL reads as SQL in a .sql file; Python only calls queries by name.
"""

from __future__ import annotations

import re
from importlib import resources

_BLOCK = re.compile(r"^-- ([a-z_]+) --\n", re.MULTILINE)


def load_queries(package: str, filename: str) -> dict[str, str]:
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    parts = _BLOCK.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.splitlines() if not line.startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries
