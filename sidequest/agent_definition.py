"""An agent file, parsed: what the file executors (anthropic, claude-code) are built from.

It lives below both `sidequest.agents` (which finds and parses agent files and builds their
executors) and `sidequest.executors` (which run them), so that the executors need nothing
from `agents` and the two modules do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sidequest.models import Duration


class SidequestKeys(BaseModel):
    """The `sidequest:` mapping in an agent file: our keys, out of Claude Code's way."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    executor: Literal["anthropic", "claude-code"] | None = None
    max_concurrency: int | None = Field(default=None, ge=1, le=1000)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    server_tools: list[Literal["web_search", "web_fetch"]] = Field(default_factory=list)
    web_search_max_uses: int | None = Field(default=None, ge=1, le=100)
    batch: bool = False
    max_budget_usd: float | None = Field(default=None, gt=0)
    timeout: Duration | None = None
    queue: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    """Which workers take this agent's tasks (shared store); default `default`."""


@dataclass(frozen=True)
class AgentDefinition:
    """One agent file, parsed and checked."""

    name: str
    description: str
    executor: str
    model: str | None
    tools: list[str] | None
    disallowed_tools: list[str] | None
    permission_mode: str | None
    max_turns: int | None
    system_prompt: str
    source: Path
    keys: SidequestKeys
    text: str = ""
    """The file as read: what a task's agent snapshot carries to other machines."""
