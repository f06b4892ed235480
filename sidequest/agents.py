"""Agent definitions: the names a model may launch, and what each one runs.

The model never chooses code: it names an agent, and only the user defines
agents (today `[agents.NAME]` tables in the config; agent files come later).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidequest.config import AgentConfig, Settings
from sidequest.executors.base import Executor
from sidequest.executors.python import PythonExecutor
from sidequest.models import AgentInfo


@dataclass(frozen=True)
class Agent:
    name: str
    description: str
    executor: Executor
    max_concurrency: int | None

    def info(self) -> AgentInfo:
        return AgentInfo(
            name=self.name,
            executor=self.executor.name,
            description=self.description,
            max_concurrency=self.max_concurrency,
        )


def _build_executor(config: AgentConfig) -> Executor:
    match config.executor:
        case "python":
            return PythonExecutor(config.callable)
    raise ValueError(f"unknown executor {config.executor!r}")  # pragma: no cover - config validation stops it


class AgentRegistry:
    def __init__(self, agents: dict[str, Agent]) -> None:
        self._agents = dict(sorted(agents.items()))

    @classmethod
    def from_settings(cls, settings: Settings) -> AgentRegistry:
        return cls(
            {
                name: Agent(name, cfg.description, _build_executor(cfg), cfg.max_concurrency)
                for name, cfg in settings.agents.items()
            }
        )

    def get(self, name: str) -> Agent | None:
        return self._agents.get(name)

    def names(self) -> list[str]:
        return list(self._agents)

    def infos(self) -> list[AgentInfo]:
        return [agent.info() for agent in self._agents.values()]
