"""Who is acting: the Principal, built from OIDC claims or the local default.

People are keyed by issuer + subject, never by e-mail alone. No Streamlit here:
the web layer turns ``st.user`` into a Principal and passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_ISSUER = "local"


@dataclass(frozen=True)
class Principal:
    issuer: str
    subject: str
    email: str | None = None
    email_verified: bool = False
    name: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.issuer, self.subject)

    @classmethod
    def local(cls) -> "Principal":
        """The one local creator of an install with no sign-in configured."""
        return cls(issuer=LOCAL_ISSUER, subject="creator", name="Local creator")

    @classmethod
    def from_claims(cls, claims: dict) -> "Principal":
        iss = str(claims.get("iss") or "").strip()
        sub = str(claims.get("sub") or "").strip()
        if not iss or not sub:
            raise ValueError("an identity needs both 'iss' and 'sub'")
        verified = claims.get("email_verified") is True
        return cls(
            issuer=iss,
            subject=sub,
            email=(claims.get("email") or None),
            email_verified=verified,
            name=claims.get("name") or None,
        )
