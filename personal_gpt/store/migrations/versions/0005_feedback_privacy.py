"""Feedback on answers, creators' corrected answers ("fix this answer"), and
privacy settings per GPT (retention, do-not-record, redaction).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False,
                  unique=True),
        sa.Column("rating", sa.SmallInteger, nullable=False),
        sa.Column("comment", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_index("ix_feedback_gpt_id", "feedback", ["gpt_id"])
    op.create_table(
        "corrections",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("message_id", sa.Integer,
                  sa.ForeignKey("messages.id", ondelete="SET NULL", name="fk_corrections_message")),
        sa.Column("question", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("target", sa.String(20), nullable=False),
        sa.Column("knowledge_file_id", sa.String(40),
                  sa.ForeignKey("knowledge_files.id", ondelete="SET NULL", name="fk_corrections_knowledge_file")),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_corrections_gpt_id", "corrections", ["gpt_id"])
    op.create_table(
        "privacy_settings",
        sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("retention_days", sa.Integer),
        sa.Column("record", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("redact", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("updated_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("privacy_settings")
    op.drop_index("ix_corrections_gpt_id", table_name="corrections")
    op.drop_table("corrections")
    op.drop_index("ix_feedback_gpt_id", table_name="feedback")
    op.drop_table("feedback")
