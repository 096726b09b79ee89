"""A fresh PostgreSQL database per test, on the session's test server (``postgres_url``):
created empty, handed out as a SQLAlchemy URL, dropped afterwards (connections forced off)."""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from typing import Iterator

import sqlalchemy as sa


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def settings_on(request) -> Iterator:
    """For a fixture parametrized ``["sqlite", "postgres"]``: the test home's Settings on
    SQLite, or the same home on a fresh PostgreSQL database (``postgres_url``)."""
    from personal_gpt.config import Settings

    base = Settings.from_env()
    if request.param == "sqlite":
        yield base
        return
    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield Settings(home=base.home, database_url=url, templates_dir=base.templates_dir)
