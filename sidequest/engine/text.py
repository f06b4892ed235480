"""Text helpers the engine's parts share: agent text made storable, one-line shortening, durations.

They sit apart so that admission, attempts, reads and the ledger can use them without
importing one another.
"""

from __future__ import annotations


def clean(text: str) -> str:
    """Text from executors may hold lone surrogates; the store takes only valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def short(text: str | None, limit: int) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration(seconds: float) -> str:
    """'45s', '2m10s', '3h05m': how a person says how long something took."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def took(seconds: float) -> str:
    """An attempt's length: fractions under a minute (most attempts are short), else as duration."""
    seconds = max(seconds, 0.0)
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s" if seconds < 60 else duration(seconds)
