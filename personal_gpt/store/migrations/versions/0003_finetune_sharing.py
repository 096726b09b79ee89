"""Fine-tuning (adapter versions, job metrics), share links, sign-in sessions and
single-use login states; users remember whether their e-mail is verified.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("email_verified", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("last_login_at", TZ))
    op.create_table(
        "job_metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_job_metrics_job_id", "job_metrics", ["job_id"])
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("job_id", sa.String(40)),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("data_summary", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("samples", sa.JSON, nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("gpt_id", "number", name="uq_adapters_number"),
    )
    op.create_index("ix_adapters_gpt_id", "adapters", ["gpt_id"])
    op.create_table(
        "share_links",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("label", sa.String(200), nullable=False, server_default=""),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("policy", sa.String(20), nullable=False),
        sa.Column("allowed_emails", sa.JSON, nullable=False),
        sa.Column("allowed_domains", sa.JSON, nullable=False),
        sa.Column("expires_at", TZ),
        sa.Column("message_quota", sa.Integer),
        sa.Column("messages_used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("opens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_used_at", TZ),
        sa.Column("revoked_at", TZ),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_index("ix_share_links_gpt_id", "share_links", ["gpt_id"])
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("share_link_id", sa.String(40)))
        batch.create_foreign_key(
            "fk_conversations_share_link", "share_links", ["share_link_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index("ix_conversations_share_link_id", ["share_link_id"])
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
        sa.Column("last_seen_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ),
    )
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    op.create_table(
        "login_states",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("state_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("browser_hash", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("nonce", sa.String(200), nullable=False),
        sa.Column("code_verifier", sa.String(200), nullable=False),
        sa.Column("return_link_id", sa.String(40)),
        sa.Column("created_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("login_states")
    op.drop_table("sessions")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_index("ix_conversations_share_link_id")
        batch.drop_constraint("fk_conversations_share_link", type_="foreignkey")
        batch.drop_column("share_link_id")
    op.drop_table("share_links")
    op.drop_table("adapters")
    op.drop_table("job_metrics")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("last_login_at")
        batch.drop_column("email_verified")
