"""Opening the database: engine, SQLite pragmas, Alembic migrations.

``open_store(settings)`` returns a migrated Store. A damaged SQLite file or an
unreachable server becomes a ``StoreError`` with one sentence; the detail goes
to the log.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from personal_gpt.config import Settings
from personal_gpt.errors import StoreError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
HEAD_REVISION = "0005"  # the newest migration; a test keeps this equal to Alembic's head
_migrate_lock = threading.Lock()


def _redacted(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return "the configured database"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent). An up-to-date database
    skips loading Alembic, which keeps the server's start fast."""
    # Two processes may open a fresh home at once (the server and a CLI command, or the
    # server's worker): one checks and migrates while the others wait, then find the schema at
    # head. On SQLite even the check waits: a first connection switching a new file to WAL
    # while another process creates tables was refused with "database is locked".
    with _migrate_lock, _across_processes(engine):
        if current_revision(engine) == HEAD_REVISION:
            return
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATE_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


_PG_MIGRATE_LOCK = 0x70677074  # "pgpt": held for the migrating transaction only


@contextmanager
def _across_processes(engine: Engine) -> Iterator[None]:
    """SQLite has no advisory locks and its DDL is not in the driver's transaction, so a lock
    file beside the database serialises migrations between processes."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    from filelock import FileLock

    with FileLock(f"{path}.migrate-lock", timeout=120):
        yield


class Store:
    """A migrated database plus short transactions for the repositories."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = url

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction: everything in it is written, or nothing is."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()


def open_store(settings: Settings) -> Store:
    url = settings.database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = make_engine(url)
        migrate(engine)
    except sa.exc.OperationalError as exc:  # before DatabaseError, its base class: busy is not damaged
        log.error("cannot open database %s: %s", _redacted(url), exc)
        if url.startswith("sqlite") and "locked" in str(exc.orig):
            raise StoreError(
                f"The database file {url.removeprefix('sqlite:///')} is locked by another program; "
                "close it (or wait a moment) and try again."
            ) from None
        raise StoreError(f"Could not open the database at {_redacted(url)}: check that it is running and reachable.") from None
    except sa.exc.DatabaseError as exc:
        log.error("cannot open database %s: %s", _redacted(url), exc)
        if url.startswith("sqlite"):
            raise StoreError(
                f"The database file {url.removeprefix('sqlite:///')} is damaged or is not a Personal GPTs "
                "database. Move it aside (or restore a backup) and start again."
            ) from None
        raise StoreError(f"Could not open the database at {_redacted(url)}: check that it is running and reachable.") from None
    except (sa.exc.InterfaceError, OSError) as exc:
        log.error("cannot open database %s: %s", _redacted(url), exc)
        raise StoreError(f"Could not open the database at {_redacted(url)}: check that it is running and reachable.") from None
    except sa.exc.ArgumentError:
        raise StoreError("PERSONAL_GPT_DATABASE_URL is not a valid database address.") from None
    return Store(engine, url)
