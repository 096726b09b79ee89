"""The accounts part of the services facade: people who sign in with OpenID
Connect, their sessions (stored hashed, with a maximum age) and single-use login
states bound to a browser. Mixed into ``Services``; the OIDC protocol itself
(redirects, code exchange, ID-token checks) lives in ``web/oidc.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Mapping

from personal_gpt.auth import LOCAL_ISSUER, Principal
from personal_gpt.errors import Forbidden, InvalidInput

log = logging.getLogger(__name__)

LOGIN_STATE_MAX_AGE = timedelta(minutes=10)
SESSION_PREFIX = "pgsess_"  # share tokens are pgs_; never the same shape
_SESSION_TOKEN = re.compile(r"pgsess_[A-Za-z0-9_-]{43}")
_BROWSER_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_STATE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_LINK_ID = re.compile(r"^[a-z]{2,5}_[0-9a-f]{8,32}$")
_TOUCH_EVERY = timedelta(minutes=5)
STATE_REFUSED = (
    "This sign-in could not be completed: it expired, was already used, or was started in another "
    "browser. Please sign in again."
)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LoginState:
    """What ``begin_login`` remembered for the callback."""

    provider: str
    nonce: str
    code_verifier: str
    return_link_id: str | None
    created_at: datetime


def _truthy_claim(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def email_verified_from_claims(claims: Mapping) -> bool:
    """``email_verified`` must be true. Microsoft Entra ID never sends it; there the
    optional ``xms_edov`` claim (the e-mail's domain is verified by the tenant) counts."""
    if "email_verified" in claims:
        return _truthy_claim(claims.get("email_verified"))
    return _truthy_claim(claims.get("xms_edov"))


class AccountMethods:
    # -- configuration ----------------------------------------------------------

    @property
    def auth_config(self):
        """The sign-in settings (``personal_gpt.auth_config.AuthConfig``), or None when
        sign-in is not configured. Re-read when the secrets file changes."""
        from personal_gpt.auth_config import load_auth_config

        return load_auth_config()

    def _require_auth_config(self):
        config = self.auth_config
        if config is None:
            raise InvalidInput("Sign-in is not set up on this server: add an [auth] section to the secrets file.")
        return config

    # -- login states -------------------------------------------------------------

    def begin_login(self, provider: str, browser_id: str, return_link_id: str | None = None) -> tuple[str, str, str]:
        """Remember a new login for this browser; returns ``(state, nonce, code_verifier)``.
        Only the SHA-256 of the state and of the browser id are stored."""
        from personal_gpt.store import accounts
        from personal_gpt.store.repos import now

        config = self._require_auth_config()
        if config.provider(provider) is None:
            raise InvalidInput("There is no sign-in provider with that name.")
        if not isinstance(browser_id, str) or not _BROWSER_ID.fullmatch(browser_id):
            raise InvalidInput("This browser's sign-in cookie is not valid; reload the page and try again.")
        if return_link_id is not None and (not isinstance(return_link_id, str) or not _LINK_ID.fullmatch(return_link_id)):
            return_link_id = None
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        code_verifier = secrets.token_urlsafe(64)  # 86 characters: RFC 7636 allows 43-128
        at = now()
        with self.store.tx() as conn:
            accounts.purge_login_states(conn, at - LOGIN_STATE_MAX_AGE)
            accounts.insert_login_state(
                conn, state_hash=sha256_hex(state), browser_hash=sha256_hex(browser_id), provider=provider,
                nonce=nonce, code_verifier=code_verifier, return_link_id=return_link_id, created_at=at,
            )
        return state, nonce, code_verifier

    def finish_login(self, state: str, browser_id: str) -> LoginState:
        """Consume the login state exactly once. Missing, unknown, reused, expired or
        another browser's state: ``Forbidden``, and the state (if any) is gone."""
        from personal_gpt.store import accounts
        from personal_gpt.store.repos import now

        if not isinstance(state, str) or not _STATE.fullmatch(state):
            raise Forbidden(STATE_REFUSED)
        with self.store.tx() as conn:
            row = accounts.take_login_state(conn, sha256_hex(state))
        if row is None:
            raise Forbidden(STATE_REFUSED)
        same_browser = isinstance(browser_id, str) and hmac.compare_digest(
            row.browser_hash, sha256_hex(browser_id)
        )
        if not same_browser:
            log.warning("login state presented by another browser; refused")
            raise Forbidden(STATE_REFUSED)
        if now() - row.created_at > LOGIN_STATE_MAX_AGE:
            raise Forbidden(STATE_REFUSED)
        return LoginState(row.provider, row.nonce, row.code_verifier, row.return_link_id, row.created_at)

    # -- sessions -------------------------------------------------------------------

    def sign_in(self, claims: Mapping, provider: str) -> str:
        """Record the person of validated ID-token claims (keyed by ``iss`` + ``sub``) and
        start a session. Returns the session token; only its SHA-256 is stored."""
        from personal_gpt.store import accounts
        from personal_gpt.store.repos import new_id, now

        config = self._require_auth_config()
        issuer = claims.get("iss") if isinstance(claims, Mapping) else None
        subject = claims.get("sub") if isinstance(claims, Mapping) else None
        if not (isinstance(issuer, str) and isinstance(subject, str) and issuer.strip() and subject.strip()):
            raise InvalidInput("The sign-in provider did not say who you are; please try again.")
        if len(issuer) > 500 or len(subject) > 500 or issuer == LOCAL_ISSUER:
            raise InvalidInput("The sign-in provider sent an identity this server cannot use.")
        email = claims.get("email")
        email = email.strip() if isinstance(email, str) and 0 < len(email.strip()) <= 320 else None
        name = claims.get("name")
        name = name.strip()[:200] if isinstance(name, str) and name.strip() else None
        verified = bool(email) and email_verified_from_claims(claims)
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        at = now()
        with self.store.tx() as conn:
            accounts.purge_sessions(conn, at - timedelta(days=1))
            user_id = accounts.upsert_user(
                conn, issuer=issuer, subject=subject, email=email, email_verified=verified, name=name, at=at,
            )
            accounts.insert_session(
                conn, session_id=new_id("ses"), token_hash=sha256_hex(token), user_id=user_id,
                provider=str(provider)[:100], created_at=at, expires_at=at + config.session_max_age,
            )
        return token

    def principal_for_session(self, token: object) -> tuple[Principal, datetime] | None:
        """The signed-in person and when they signed in, or None for anything that is
        not a live session (unknown, forged, revoked, expired, garbage). A lowered
        ``session_max_age_hours`` also ends older sessions."""
        from personal_gpt.store import accounts
        from personal_gpt.store.repos import now

        if not isinstance(token, str) or not _SESSION_TOKEN.fullmatch(token):
            return None
        with self.store.read() as conn:
            found = accounts.session_identity(conn, sha256_hex(token))
        if found is None or found.revoked_at is not None:
            return None
        at = now()
        ends = found.expires_at
        config = self.auth_config
        if config is not None:
            ends = min(ends, found.created_at + config.session_max_age)
        if at >= ends:
            return None
        if at - found.last_seen_at > _TOUCH_EVERY:
            with self.store.tx() as conn:
                accounts.touch_session(conn, found.session_id, at)
        principal = Principal(
            issuer=found.issuer, subject=found.subject, email=found.email,
            email_verified=bool(found.email and found.email_verified), name=found.name,
        )
        return principal, found.created_at

    def sign_out(self, token: object) -> None:
        """End the session (if it is one). Never raises on garbage."""
        from personal_gpt.store import accounts
        from personal_gpt.store.repos import now

        if not isinstance(token, str) or not _SESSION_TOKEN.fullmatch(token):
            return
        with self.store.tx() as conn:
            accounts.revoke_session(conn, sha256_hex(token), now())

    # -- who may create ------------------------------------------------------------------

    def is_creator(self, principal: Principal) -> bool:
        """With sign-in configured: a verified e-mail listed in ``creators`` (or in a
        listed ``@domain``). Without it: only the local creator."""
        if not isinstance(principal, Principal):
            return False
        config = self.auth_config
        if config is None:
            return principal.key == Principal.local().key
        if principal.issuer == LOCAL_ISSUER or not principal.email_verified:
            return False
        return config.is_creator_email(principal.email)

    def creator_by_email(self, email: str) -> Principal:
        """The creator with this verified e-mail who has signed in before (for the CLI's
        ``--as``). Without sign-in configured there is only the local creator."""
        import sqlalchemy as sa

        from personal_gpt.store.schema import users

        config = self.auth_config
        if config is None:
            raise InvalidInput("Sign-in is not configured here, so there is only the local creator: drop --as.")
        wanted = (email or "").strip().lower()
        with self.store.read() as conn:
            rows = conn.execute(
                sa.select(users.c.issuer, users.c.subject, users.c.email, users.c.name)
                .where(sa.func.lower(users.c.email) == wanted, users.c.email_verified.is_(True))
            ).all()
        people = [Principal(issuer=r.issuer, subject=r.subject, email=r.email, email_verified=True, name=r.name)
                  for r in rows]
        people = [p for p in people if self.is_creator(p)]
        if not people:
            raise InvalidInput(f"No creator with the verified e-mail {email} has signed in here yet: they sign in "
                               "once in the web app first.")
        if len(people) > 1:
            raise InvalidInput(f"Several sign-in providers know {email}; the CLI cannot tell which one you mean.")
        return people[0]
