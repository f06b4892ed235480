"""A full disk under a real daemon: fail-stop, never a silent loss.

The data dir is a real tmpfs of a few megabytes, filled by a file we can delete. The daemon
takes submits of 150 kB prompts until a write fails; from then on it must acknowledge nothing,
answer 503 `store_unavailable`, and exit. After space is freed and it restarts, every task it
acknowledged (HTTP 201) is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx2
import pytest

import sidequest
from sidequest.server.daemon import read_state

pytestmark = pytest.mark.slow

REPO = Path(sidequest.__file__).resolve().parent.parent
TMPFS_MB = 24


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs (the test machines run as root); failing to mount is a failure, not a skip."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a {TMPFS_MB} MB tmpfs for the disk-full test: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def start_daemon(home: Path) -> subprocess.Popen[str]:
    env = {
        "SIDEQUEST_HOME": str(home),
        "SIDEQUEST_CONFIG": str(home / "test.toml"),
        "PYTHONPATH": str(REPO),
        "PATH": os.environ.get("PATH", ""),
    }
    log = open(home.parent / "daemon.err", "a")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidequest.cli", "serve"],
        env=env,
        cwd=home.parent,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = read_state(home)
        if state is not None and state.pid == proc.pid:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited at start: {(home.parent / 'daemon.err').read_text()}")
        time.sleep(0.05)
    raise AssertionError("the daemon did not start in 30 s")


def client(home: Path) -> httpx2.Client:
    state = read_state(home)
    assert state is not None
    return httpx2.Client(
        base_url=state.url + "/api/v1",
        headers={"Authorization": f"Bearer {state.token}"},
        timeout=30,
        trust_env=False,
    )


def test_disk_full_fails_stop_and_loses_no_acknowledged_task(small_disk: Path) -> None:
    home = small_disk / "home"
    home.mkdir()
    (home / "test.toml").write_text(
        'max_request_bytes = 400000\n[agents.echo]\ncallable = "sidequest.testing.agents:echo"\n',
        encoding="utf-8",
    )
    daemon = start_daemon(home)
    try:
        # Leave ~5 MB free: the database, its WAL and a few dozen 150 kB prompts fill it.
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * max(0, free - 5 * 1024 * 1024))

        state = read_state(home)
        assert state is not None
        acknowledged: list[str] = []
        checked_health = False
        refusals: list[tuple[int, dict[str, str]]] = []
        with client(home) as http:
            for i in range(400):
                prompt = f"{i} " + os.urandom(75_000).hex()  # 150 kB that does not compress
                try:
                    response = http.post("/tasks", json={"agent_definition": "echo", "prompt": prompt})
                except httpx2.TransportError:
                    break  # the daemon is gone: it stopped, as it must
                if response.status_code == 201:
                    assert not refusals, "a submit was acknowledged after the store failed"
                    acknowledged.append(response.json()["task_id"])
                    continue
                refusals.append((response.status_code, response.json()))
                if len(refusals) == 1:  # while it stops, the daemon says why
                    with suppress(httpx2.TransportError):
                        health = httpx2.get(f"{state.url}/health", trust_env=False)
                        assert health.status_code == 503, health.text
                        assert health.json()["code"] == "store_unavailable", health.text
                        checked_health = True
                if daemon.poll() is not None:
                    break
        assert acknowledged, "no submit succeeded before the disk filled"
        assert checked_health, "/health was not seen reporting the failure"
        assert len(acknowledged) < 400, "the disk never filled"
        for status, body in refusals:
            assert status == 503 and body["code"] == "store_unavailable", (status, body)
            assert "No space left on device" in body["message"] or "space" in body["message"], body

        # Fail-stop: the daemon exits by itself, saying why.
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the daemon kept running (a zombie) after its store failed")
        assert daemon.returncode != 0
        said = (small_disk / "daemon.err").read_text()
        assert "store" in said and "failed" in said, said

        # Space freed, daemon restarted: every acknowledged task is there.
        filler.unlink()
        daemon = start_daemon(home)
        with client(home) as http:
            missing = [t for t in acknowledged if http.get(f"/tasks/{t}").status_code != 200]
            assert missing == [], f"{len(missing)} of {len(acknowledged)} acknowledged tasks were lost"
            # and the daemon works again: the recovered tasks run to completion
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                statuses = {http.get(f"/tasks/{t}").json()["status"] for t in acknowledged}
                if statuses == {"completed"}:
                    break
                time.sleep(0.2)
            assert statuses == {"completed"}, statuses
    finally:
        with suppress(ProcessLookupError):
            daemon.kill()
        daemon.wait(timeout=10)


async def test_after_the_first_failed_write_the_engine_acknowledges_nothing(small_disk: Path) -> None:
    """In-process, on the same kind of full disk: the failure is sticky and every call says why."""
    from sidequest.config import AgentConfig, Settings
    from sidequest.engine.engine import Engine
    from sidequest.engine.errors import StoreUnavailable

    settings = Settings(
        home=small_disk / "engine",
        max_request_bytes=400_000,
        agents={"echo": AgentConfig(callable="sidequest.testing.agents:echo")},
    )
    engine = Engine(settings)
    async with engine.running():
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        (small_disk / "filler").write_bytes(b"\0" * max(0, free - 3 * 1024 * 1024))
        acknowledged = []
        with pytest.raises(StoreUnavailable) as caught:
            for i in range(400):
                acknowledged.append((await engine.submit("echo", f"{i} " + os.urandom(75_000).hex())).task_id)
        assert "No space left on device" in str(caught.value) and str(settings.database_path) in str(
            caught.value
        )
        assert engine.failed.is_set() and engine.failure is caught.value
        for call in (
            engine.submit("echo", "small"),
            engine.get_task(acknowledged[0]),
            engine.list_active_workflows(all_scopes=True),
        ):
            with pytest.raises(StoreUnavailable):
                await call
    (small_disk / "filler").unlink()
    engine = Engine(settings)
    async with engine.running():
        for task_id in acknowledged:
            assert (await engine.get_task(task_id)).task_id == task_id
