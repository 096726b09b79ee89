"""Embed widget settings per GPT, HTTP API keys (stored hashed), and where a
widget or API conversation came from; messages indexed by time for rate limits.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False, server_default=""),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("hint", sa.String(20), nullable=False, server_default=""),
        sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("last_used_at", TZ),
        sa.Column("revoked_at", TZ),
    )
    op.create_index("ix_api_keys_gpt_id", "api_keys", ["gpt_id"])
    op.create_table(
        "embed_settings",
        sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("allowed_sites", sa.JSON, nullable=False),
        sa.Column("policy", sa.String(20), nullable=False, server_default="public"),
        sa.Column("allowed_emails", sa.JSON, nullable=False),
        sa.Column("allowed_domains", sa.JSON, nullable=False),
        sa.Column("theme", sa.JSON, nullable=False),
        sa.Column("limits", sa.JSON, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("site", sa.String(300)))
        batch.add_column(sa.Column("api_key_id", sa.String(40)))
        batch.create_foreign_key(
            "fk_conversations_api_key", "api_keys", ["api_key_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index("ix_conversations_api_key_id", ["api_key_id"])
    op.create_index("ix_messages_created_at", "messages", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_messages_created_at", "messages")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_index("ix_conversations_api_key_id")
        batch.drop_constraint("fk_conversations_api_key", type_="foreignkey")
        batch.drop_column("api_key_id")
        batch.drop_column("site")
    op.drop_table("embed_settings")
    op.drop_index("ix_api_keys_gpt_id", "api_keys")
    op.drop_table("api_keys")
