"""Alembic environment: runs our migrations on the connection the Store hands in."""

from alembic import context

from personal_gpt.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
