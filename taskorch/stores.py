"""Pick the store for a database location: a file path is SQLite, a postgresql:// URL PostgreSQL.

The one place that knows both dialects exist. The PostgreSQL modules (and asyncpg) are imported
only when a URL asks for them, so a stdio server on SQLite never pays for them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .config import Config, ConfigError, is_postgres_url
from .resources import migrations_dir
from .store_api import Clock, Store, system_clock

__all__ = ["is_postgres_url", "migrate_store", "open_store", "redacted_url"]

_SECRET_PARAMS = {"password", "sslpassword"}


def redacted_url(url: str) -> str:
    """The URL with its password (in the user part or the query) replaced by ***; for logs and /health."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, host = netloc.rsplit("@", 1)
            if ":" in user:
                user = user.split(":", 1)[0] + ":***"
            netloc = f"{user}@{host}"
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # unparsable: show nothing that could be a secret
        return url.split("://", 1)[0] + "://***"


def _require_asyncpg(url: str) -> None:
    if importlib.util.find_spec("asyncpg") is None:
        raise ConfigError(
            f"store.path is a PostgreSQL URL ({redacted_url(url)}), but its driver is not installed: "
            "pip install 'taskorch[postgres]'"
        )


async def open_store(
    location: str | Path, config: Config, *, durability: str | None = None, clock: Clock | None = None
) -> Store:
    """Open (creating and migrating) the database at `location`.

    `clock` is for tests: None means the store's own time (the system clock for a SQLite file,
    the database server's clock for PostgreSQL, so that every server agrees on lease expiry).
    """
    mode = durability or config.store.durability
    if is_postgres_url(location):
        assert isinstance(location, str)
        _require_asyncpg(location)
        from .pg_store import PostgresStore

        return await PostgresStore.open(
            location, config.store.postgres, durability=mode, migrations=migrations_dir("postgres"), clock=clock
        )
    from .store import SqliteStore

    return await SqliteStore.open(
        Path(location).expanduser(),  # noqa: ASYNC240 (no I/O: expands ~)
        durability=mode,
        busy_timeout_ms=config.store.busy_timeout_ms,
        inline_writes=config.store.inline_writes,
        migrations_dir=migrations_dir("sqlite"),
        clock=clock or system_clock,
    )


async def migrate_store(location: str | Path, config: Config) -> list[str]:
    """Apply the pending migrations at `location`; return their names."""
    if is_postgres_url(location):
        assert isinstance(location, str)
        _require_asyncpg(location)
        from .pg_db import PgDatabase

        return await PgDatabase.migrate_only(location, config.store.postgres, migrations_dir("postgres"))
    from .db import Database

    db = await Database.open(
        Path(location).expanduser(),  # noqa: ASYNC240 (no I/O: expands ~)
        durability=config.store.durability,
        busy_timeout_ms=config.store.busy_timeout_ms,
        inline_writes=False,
    )
    try:
        return await db.migrate(migrations_dir("sqlite"))
    finally:
        await db.close()
