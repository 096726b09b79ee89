"""Two or more processes opening one fresh home at once (the server, its fine-tune worker and a
CLI command) must all end up with a migrated database: the CI run of stop 13 failed on exactly
this race ("table users already exists" while a test and the live server started together)."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.pg import fresh_database

PROCESSES = 4
ROUNDS = 3


def _open_at(url: str, start_at: float, out) -> None:
    from personal_gpt.config import Settings
    from personal_gpt.store.db import open_store

    settings = Settings(home=Path("/nonexistent-home-not-used"), database_url=url)
    time.sleep(max(0.0, start_at - time.time()))  # every process past its imports, then all at once
    try:
        store = open_store(settings)
        store.close()
        out.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(f"{type(exc).__name__}: {exc}")


def _race(url: str) -> list[str]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 4.0
    procs = [ctx.Process(target=_open_at, args=(url, start_at, out)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return results


def _revision(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.timeout(300)
def test_processes_opening_one_fresh_sqlite_file_together_all_succeed(tmp_path):
    from personal_gpt.store.db import HEAD_REVISION

    for n in range(ROUNDS):
        url = f"sqlite:///{tmp_path / f'round{n}.db'}"
        assert _race(url) == ["ok"] * PROCESSES
        assert _revision(url) == HEAD_REVISION


@pytest.mark.timeout(300)
def test_processes_opening_one_fresh_postgres_database_together_all_succeed(postgres_url):
    from personal_gpt.store.db import HEAD_REVISION

    for _ in range(ROUNDS):
        with fresh_database(postgres_url) as url:
            assert _race(url) == ["ok"] * PROCESSES
            assert _revision(url) == HEAD_REVISION
