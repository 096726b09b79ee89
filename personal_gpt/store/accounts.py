"""Repository functions for accounts: people (by issuer + subject), sign-in sessions
and single-use login states. Plain data in, plain data out.

Secrets never reach this module in clear: sessions and login states are looked up by
the SHA-256 of their token, which the caller computes. The caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from personal_gpt.store.repos import _aware
from personal_gpt.store.schema import login_states, sessions, users


@dataclass(frozen=True)
class LoginStateRow:
    provider: str
    browser_hash: str
    nonce: str
    code_verifier: str
    return_link_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class SessionIdentity:
    session_id: str
    user_id: int
    provider: str
    created_at: datetime
    expires_at: datetime
    last_seen_at: datetime
    revoked_at: datetime | None
    issuer: str
    subject: str
    email: str | None
    email_verified: bool
    name: str | None


# --- login states ------------------------------------------------------------


def insert_login_state(
    conn: Connection, *, state_hash: str, browser_hash: str, provider: str, nonce: str, code_verifier: str,
    return_link_id: str | None, created_at: datetime,
) -> None:
    conn.execute(
        sa.insert(login_states).values(
            state_hash=state_hash, browser_hash=browser_hash, provider=provider, nonce=nonce,
            code_verifier=code_verifier, return_link_id=return_link_id, created_at=created_at,
        )
    )


def take_login_state(conn: Connection, state_hash: str) -> LoginStateRow | None:
    """Remove the state and return it, or None when it is not there. Of two callers
    racing for the same state only the one whose DELETE removed the row gets it."""
    row = conn.execute(sa.select(login_states).where(login_states.c.state_hash == state_hash)).first()
    if row is None:
        return None
    deleted = conn.execute(sa.delete(login_states).where(login_states.c.id == row.id)).rowcount
    if deleted != 1:
        return None
    return LoginStateRow(
        provider=row.provider, browser_hash=row.browser_hash, nonce=row.nonce, code_verifier=row.code_verifier,
        return_link_id=row.return_link_id, created_at=_aware(row.created_at),
    )


def purge_login_states(conn: Connection, created_before: datetime) -> int:
    return conn.execute(sa.delete(login_states).where(login_states.c.created_at < created_before)).rowcount


def count_login_states(conn: Connection) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(login_states)).scalar_one()


# --- people ------------------------------------------------------------------


def upsert_user(
    conn: Connection, *, issuer: str, subject: str, email: str | None, email_verified: bool, name: str | None,
    at: datetime,
) -> int:
    """The user's id, created on first sign-in; e-mail, its verification and the
    name are refreshed from every sign-in (an address can stop being verified)."""
    values = dict(email=email, email_verified=email_verified, last_login_at=at)
    if name:
        values["name"] = name
    found = conn.execute(
        sa.select(users.c.id).where(users.c.issuer == issuer, users.c.subject == subject)
    ).scalar()
    if found is None:
        try:
            with conn.begin_nested():
                return conn.execute(
                    sa.insert(users).values(issuer=issuer, subject=subject, created_at=at, **values)
                ).inserted_primary_key[0]
        except sa.exc.IntegrityError:  # the same person signing in twice at once
            found = conn.execute(
                sa.select(users.c.id).where(users.c.issuer == issuer, users.c.subject == subject)
            ).scalar_one()
    conn.execute(sa.update(users).where(users.c.id == found).values(**values))
    return found


# --- sessions ----------------------------------------------------------------


def insert_session(
    conn: Connection, *, session_id: str, token_hash: str, user_id: int, provider: str, created_at: datetime,
    expires_at: datetime,
) -> None:
    conn.execute(
        sa.insert(sessions).values(
            id=session_id, token_hash=token_hash, user_id=user_id, provider=provider, created_at=created_at,
            expires_at=expires_at, last_seen_at=created_at,
        )
    )


def session_identity(conn: Connection, token_hash: str) -> SessionIdentity | None:
    row = conn.execute(
        sa.select(
            sessions.c.id, sessions.c.user_id, sessions.c.provider, sessions.c.created_at, sessions.c.expires_at,
            sessions.c.last_seen_at, sessions.c.revoked_at, users.c.issuer, users.c.subject, users.c.email,
            users.c.email_verified, users.c.name,
        )
        .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
        .where(sessions.c.token_hash == token_hash)
    ).first()
    if row is None:
        return None
    return SessionIdentity(
        session_id=row.id, user_id=row.user_id, provider=row.provider, created_at=_aware(row.created_at),
        expires_at=_aware(row.expires_at), last_seen_at=_aware(row.last_seen_at), revoked_at=_aware(row.revoked_at),
        issuer=row.issuer, subject=row.subject, email=row.email, email_verified=bool(row.email_verified),
        name=row.name,
    )


def touch_session(conn: Connection, session_id: str, at: datetime) -> None:
    conn.execute(sa.update(sessions).where(sessions.c.id == session_id).values(last_seen_at=at))


def revoke_session(conn: Connection, token_hash: str, at: datetime) -> bool:
    done = conn.execute(
        sa.update(sessions)
        .where(sessions.c.token_hash == token_hash, sessions.c.revoked_at.is_(None))
        .values(revoked_at=at)
    ).rowcount
    return done == 1


def purge_sessions(conn: Connection, expired_before: datetime) -> int:
    """Forget sessions that ended (expired or revoked) before the given time."""
    return conn.execute(
        sa.delete(sessions).where(
            sa.or_(sessions.c.expires_at < expired_before, sessions.c.revoked_at < expired_before)
        )
    ).rowcount


def count_sessions(conn: Connection, user_id: int | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(sessions)
    if user_id is not None:
        query = query.where(sessions.c.user_id == user_id)
    return conn.execute(query).scalar_one()
