"""Backoff between attempts: exponential, capped, jittered so retries of many tasks spread out."""

from __future__ import annotations

import random

from sidequest.models import RetryBackoff


def backoff_delay(policy: RetryBackoff, failures: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `failures`-th failed attempt (1-based)."""
    exponent = max(0, failures - 1)
    base = min(policy.max, policy.initial * policy.factor**exponent)
    if policy.jitter <= 0 or base <= 0:
        return base
    draw = (rng or random).random()
    return base * (1.0 - policy.jitter * draw)
