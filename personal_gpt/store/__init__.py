"""The database: schema, migrations and repositories.

SQLite (WAL) under PERSONAL_GPT_HOME by default, PostgreSQL by URL. Every
repository query is scoped by owner or GPT; nothing here knows about
Streamlit, HTTP or models.
"""

from personal_gpt.store.db import Store, open_store

__all__ = ["Store", "open_store"]
