"""Which Store a configuration means: the one place that turns `database` into a store object.

Every process that runs an engine (the daemon, `stdio --embedded`, `sidequest worker`) and
`sidequest migrate` call this, so a DSN and a path can never be read two ways. The store modules are
imported only when chosen: DuckDB users need not have a PostgreSQL driver loaded, and the reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidequest.config import Settings
    from sidequest.storage.base import Store


def open_store(settings: Settings) -> Store:
    """A new, unopened store for `settings.database` (the engine opens it when it starts)."""
    if settings.database_url is not None:
        from sidequest.storage.postgres import PostgresStore, schema_of

        dsn = settings.database_url
        return PostgresStore(dsn, schema=schema_of(dsn), idempotency_window=settings.idempotency_window)
    from sidequest.storage.duckdb import DuckDBStore

    return DuckDBStore(settings.database_path)
