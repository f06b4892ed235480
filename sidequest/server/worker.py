"""`sidequest worker`: an executor pool with no HTTP, for a shared (PostgreSQL) store.

Any number run per machine, on any number of machines; each claims the work it can run (its
queues), renews its leases (which is how cancels made elsewhere reach it), reaps the attempts of
workers that died, and says it is alive (`sidequest workers`). SIGTERM drains like the daemon:
running attempts get `shutdown_grace` to finish, then go back to the queue.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

import anyio

from sidequest.config import Settings
from sidequest.server.runner import (
    Fatal,
    _apply_environment,
    _startup_errors,
    _stop_on_signal,
    _stop_on_store_failure,
)

log = logging.getLogger("sidequest")


async def run_worker(settings: Settings, concurrency: int, queues: Sequence[str]) -> None:
    from sidequest.engine.engine import Engine
    from sidequest.storage.open import open_store

    if settings.store_kind != "postgres":
        raise Fatal(
            'sidequest worker needs a shared store: set database = "postgresql://…" (or '
            "SIDEQUEST_DATABASE); on DuckDB the daemon runs the work itself"
        )
    if concurrency < 1:
        raise Fatal(f"--concurrency must be at least 1, got {concurrency}")
    settings = settings.model_copy(update={"max_concurrency": concurrency})
    queues = list(dict.fromkeys(queues)) or ["default"]
    _apply_environment(settings)
    with _startup_errors():
        store = open_store(settings)
        engine = Engine(settings, store, queues=queues, role="worker")
        async with engine.running():
            log.info(
                "worker %s on %s: queues %s, concurrency %d",
                engine.worker_id,
                socket.gethostname(),
                ", ".join(queues),
                settings.max_concurrency,
            )
            async with anyio.create_task_group() as tg:
                await tg.start(_stop_on_signal, tg.cancel_scope)
                tg.start_soon(_stop_on_store_failure, engine, tg.cancel_scope.cancel)
                await anyio.sleep_forever()
        if engine.failure is not None:
            raise Fatal(f"stopped because the store failed: {engine.failure}")
    log.info("worker stopped")
