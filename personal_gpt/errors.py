"""Our exceptions. Each carries one sentence a creator understands.

The UI shows ``str(error)``; the CLI prints it on stderr and exits 2; the HTTP
API returns it as JSON with ``error.status``. Details for operators go to the
log, never into the message.
"""

from __future__ import annotations


class PersonalGptError(Exception):
    """Base class: ``str(exc)`` is the sentence shown to the person."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class InvalidInput(PersonalGptError):
    code = "invalid_input"


class NotFound(PersonalGptError):
    status = 404
    code = "not_found"


class Forbidden(PersonalGptError):
    status = 403
    code = "forbidden"


class Conflict(PersonalGptError):
    status = 409
    code = "conflict"


class InvalidTemplate(InvalidInput):
    code = "invalid_template"


class ModelError(PersonalGptError):
    """A model could not be loaded or reached."""

    status = 502
    code = "model_error"


class StoreError(PersonalGptError):
    """The database cannot be opened or is damaged."""

    status = 500
    code = "store_error"


class TooLarge(InvalidInput):
    """A request, message or conversation over its size limit."""

    status = 413
    code = "too_large"


class RateLimited(PersonalGptError):
    """Too many messages: per visitor (minute, day) or per GPT (day).
    ``retry_after`` is the number of seconds until the next message is allowed."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int = 60):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class Unauthorized(PersonalGptError):
    """No credentials, or credentials we do not recognise (a missing or revoked API key)."""

    status = 401
    code = "unauthorized"
