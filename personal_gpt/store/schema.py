"""Table definitions (SQLAlchemy Core). Migrations in ``migrations/`` create
exactly these; a test compares the migrated database with this metadata.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("issuer", sa.String(500), nullable=False),
    sa.Column("subject", sa.String(500), nullable=False),
    sa.Column("email", sa.String(320)),
    sa.Column("name", sa.String(200)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("email_verified", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_login_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("issuer", "subject", name="uq_users_identity"),
)

gpts = sa.Table(
    "gpts",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("draft", sa.JSON, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("published_version", sa.Integer),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

gpt_versions = sa.Table(
    "gpt_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("note", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("gpt_id", "number", name="uq_gpt_versions_number"),
)

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("source", sa.String(40), nullable=False),
    sa.Column("version_number", sa.Integer),
    sa.Column("title", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column(
        "share_link_id", sa.String(40), sa.ForeignKey("share_links.id", ondelete="SET NULL", name="fk_conversations_share_link"),
        index=True,
    ),
    # 0004: where a widget or API conversation came from
    sa.Column("site", sa.String(300)),  # the embedding page's origin, e.g. https://www.example.com
    sa.Column(
        "api_key_id", sa.String(40), sa.ForeignKey("api_keys.id", ondelete="SET NULL", name="fk_conversations_api_key"),
        index=True,
    ),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "conversation_id", sa.String(40), sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),  # index: 0004 (rate limits)
)

providers = sa.Table(
    "providers",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("base_url", sa.String(500), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("api_key_encrypted", sa.Text, nullable=False, server_default=""),
    sa.Column("context_window", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

knowledge_files = sa.Table(
    "knowledge_files",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("display_name", sa.String(300), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("filetype", sa.String(20), nullable=False, server_default=""),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    sa.Column("pages", sa.Integer),
    sa.Column("chunk_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("gpt_id", "content_hash", name="uq_knowledge_files_content"),
)

chunks = sa.Table(
    "chunks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column(
        "file_id", sa.String(40), sa.ForeignKey("knowledge_files.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    sa.Column("ordinal", sa.Integer, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("page", sa.Integer),
    sa.Column("section", sa.String(300)),
    sa.Column("embedding", sa.LargeBinary, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("status", sa.String(20), nullable=False, index=True),
    sa.Column("progress", sa.Float, nullable=False, server_default="0"),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# -- fine-tuning (0003) ---------------------------------------------------------

job_metrics = sa.Table(
    "job_metrics",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

adapters = sa.Table(
    "adapters",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("job_id", sa.String(40)),
    sa.Column("base_model", sa.String(500), nullable=False),
    sa.Column("path", sa.String(500), nullable=False),
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("data_summary", sa.JSON, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("samples", sa.JSON, nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("gpt_id", "number", name="uq_adapters_number"),
)

# -- share links and sign-in (0003) ----------------------------------------------

share_links = sa.Table(
    "share_links",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("label", sa.String(200), nullable=False, server_default=""),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("policy", sa.String(20), nullable=False),
    sa.Column("allowed_emails", sa.JSON, nullable=False),
    sa.Column("allowed_domains", sa.JSON, nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("message_quota", sa.Integer),
    sa.Column("messages_used", sa.Integer, nullable=False, server_default="0"),
    sa.Column("opens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("provider", sa.String(100), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

login_states = sa.Table(
    "login_states",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("state_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("browser_hash", sa.String(64), nullable=False),
    sa.Column("provider", sa.String(100), nullable=False),
    sa.Column("nonce", sa.String(200), nullable=False),
    sa.Column("code_verifier", sa.String(200), nullable=False),
    sa.Column("return_link_id", sa.String(40)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


# -- embed widget, HTTP API keys (0004) --------------------------------------------

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.String(100), nullable=False, server_default=""),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # SHA-256 hex; the key itself is shown once
    sa.Column("hint", sa.String(20), nullable=False, server_default=""),  # e.g. the last 4 characters, for lists
    sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

embed_settings = sa.Table(
    "embed_settings",
    metadata,
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("allowed_sites", sa.JSON, nullable=False),  # empty list = the embed is off
    sa.Column("policy", sa.String(20), nullable=False, server_default="public"),  # "public" | "signin"
    sa.Column("allowed_emails", sa.JSON, nullable=False),
    sa.Column("allowed_domains", sa.JSON, nullable=False),
    sa.Column("theme", sa.JSON, nullable=False),  # colour, title, greeting, avatar, position, open on load
    sa.Column("limits", sa.JSON, nullable=False),  # rate and size limits for widget and API visitors
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


# -- feedback, corrections, privacy (0005) ---------------------------------------------

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column(
        "message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False, unique=True
    ),  # one rating per answer: the conversation's person may change it
    sa.Column("rating", sa.SmallInteger, nullable=False),  # 1 = thumbs up, -1 = thumbs down
    sa.Column("comment", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

corrections = sa.Table(
    "corrections",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="SET NULL", name="fk_corrections_message")),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("target", sa.String(20), nullable=False),  # "knowledge" | "finetune"
    sa.Column(
        "knowledge_file_id", sa.String(40),
        sa.ForeignKey("knowledge_files.id", ondelete="SET NULL", name="fk_corrections_knowledge_file"),
    ),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

privacy_settings = sa.Table(
    "privacy_settings",
    metadata,
    sa.Column("gpt_id", sa.String(40), sa.ForeignKey("gpts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("retention_days", sa.Integer),  # None = keep forever
    sa.Column("record", sa.Boolean, nullable=False, server_default=sa.true()),  # False = do not record conversations
    sa.Column("redact", sa.Boolean, nullable=False, server_default=sa.false()),  # e-mails / phone numbers in stored text
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
