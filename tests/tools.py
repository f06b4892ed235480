"""Calling the MCP tools from tests: structured results, and errors as the text a model would read."""

from __future__ import annotations

from typing import Any

from conftest import wait_for
from mcp import Client


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text  # type: ignore[union-attr]
    assert result.structured_content is not None
    return result.structured_content


async def call_error(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool}({args}) succeeded: {result.structured_content}"
    return result.content[0].text  # type: ignore[union-attr]


async def submit(client: Client, agent: str, prompt: str, **options: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"agent_definition": agent, "prompt": prompt}
    if options:
        args["options"] = options
    return await call(client, "task_async", **args)


async def wait_status(client: Client, task_id: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        report = await call(client, "check_workflow_status", task_id=task_id)
        return report["task"] if report["task"]["status"] == status else None

    return await wait_for(check, timeout=timeout, what=f"task {task_id} to be {status}")
