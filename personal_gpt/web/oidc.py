"""Sign-in with any OpenID Connect provider: the ``/auth/*`` Starlette routes (code
flow with PKCE S256, single-use state bound to the browser, nonce), ID-token checks,
and ``principal_from_cookies`` for the Streamlit pages.

The only module that talks to sign-in providers (httpx, nothing else). Sessions and
login states are kept by ``services_accounts``; a failure is a small escaped HTML page
with one sentence, never a traceback. It never reads a return address from the URL.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import quote, urlencode, urlsplit

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from personal_gpt.auth import Principal
from personal_gpt.auth_config import (
    CALLBACK_PATH,
    DISCOVERY_SUFFIX,
    AuthConfig,
    ProviderConfig,
    check_url,
    load_auth_config,
)
from personal_gpt.errors import Forbidden, InvalidInput, PersonalGptError

log = logging.getLogger(__name__)

BROWSER_COOKIE = "pgpt_browser"
SESSION_COOKIE = "pgpt_session"
LINK_COOKIE = "pgpt_link"  # set (signed) by the share route (web/share_routes.py): the link a visitor came through
BROWSER_COOKIE_MAX_AGE = 30 * 24 * 3600
SHARED_PATH = "/shared"
CACHE_SECONDS = 300
MAX_DOCUMENT_BYTES = 512 * 1024
HTTP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
CLOCK_LEEWAY_SECONDS = 60
# Asymmetric signatures only: never "none", never an HMAC keyed with something public.
SAFE_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_BROWSER_ID = re.compile(r"^[A-Za-z0-9_-]{43}$")
_LINK_ID = re.compile(r"^[a-z]{2,5}_[0-9a-f]{8,32}$")

NOT_SET_UP = "Sign-in is not set up on this server. Ask the person who runs it to configure a sign-in provider."
MISCONFIGURED = "Sign-in is not available right now because its settings are incomplete. Ask the person who runs this server to check them."
UNREACHABLE = "The sign-in provider cannot be reached right now. Please try again in a few minutes."
REJECTED = "The sign-in could not be verified, so you were not signed in. Please try again."
NO_SUCH_PROVIDER = "There is no sign-in option with that name."
CANCELLED = "The sign-in was cancelled or refused at the provider, so you were not signed in."
NOT_SIGNED_IN = "You are not signed in, or your sign-in has expired."
UNAVAILABLE = "Sign-in is not available right now. Please try again in a few minutes."


class SignInUnavailable(PersonalGptError):
    """The provider cannot be reached, or its settings/metadata are unusable."""

    status = 503
    code = "sign_in_unavailable"


class SignInRejected(Forbidden):
    """What came back from the provider did not pass our checks."""

    status = 400
    code = "sign_in_rejected"


# --- provider metadata and keys, cached in memory for a few minutes ------------


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    auth_methods: tuple[str, ...]


_cache: dict[tuple[str, str], tuple[float, Any]] = {}
_cache_lock = threading.Lock()


def _cached(kind: str, key: str) -> Any | None:
    with _cache_lock:
        hit = _cache.get((kind, key))
    return hit[1] if hit is not None and hit[0] > time.monotonic() else None


def _remember(kind: str, key: str, value: Any) -> None:
    with _cache_lock:
        _cache[(kind, key)] = (time.monotonic() + CACHE_SECONDS, value)


def clear_cache() -> None:
    """Forget cached discovery documents and keys (tests; a rotated provider)."""
    with _cache_lock:
        _cache.clear()


async def _get_json(client: httpx.AsyncClient, url: str, what: str) -> dict:
    try:
        response = await client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        log.warning("sign-in provider unreachable: %s %s: %s", what, url, exc.__class__.__name__)
        raise SignInUnavailable(UNREACHABLE) from None
    if response.status_code != 200 or len(response.content) > MAX_DOCUMENT_BYTES:
        log.warning("sign-in provider %s at %s answered %s", what, url, response.status_code)
        raise SignInUnavailable(UNREACHABLE if response.status_code >= 500 else MISCONFIGURED)
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        log.warning("sign-in provider %s at %s is not a JSON object", what, url)
        raise SignInUnavailable(MISCONFIGURED)
    return data


async def provider_metadata(client: httpx.AsyncClient, provider: ProviderConfig) -> ProviderMetadata:
    """The provider's discovery document, checked: its ``issuer`` must be the address
    it was fetched from (OpenID Connect Discovery 1.0, section 4.3)."""
    hit = _cached("metadata", provider.server_metadata_url)
    if hit is not None:
        return hit
    data = await _get_json(client, provider.server_metadata_url, "discovery document")
    issuer = data.get("issuer")
    expected = provider.server_metadata_url.rstrip("/")[: -len(DISCOVERY_SUFFIX)]
    if not isinstance(issuer, str) or issuer.rstrip("/") != expected.rstrip("/"):
        log.warning("provider %s: issuer %r does not match %s", provider.name, issuer, provider.server_metadata_url)
        raise SignInUnavailable(MISCONFIGURED)
    try:
        endpoints = {
            key: check_url(data.get(key), f"{key} of provider {provider.name}")
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri")
        }
    except InvalidInput as exc:
        log.warning("provider %s metadata: %s", provider.name, exc)
        raise SignInUnavailable(MISCONFIGURED) from None
    offered = data.get("id_token_signing_alg_values_supported") or ["RS256"]
    algorithms = tuple(a for a in offered if a in SAFE_ALGORITHMS) if isinstance(offered, list) else ()
    if not algorithms:
        log.warning("provider %s signs ID tokens only with %r", provider.name, offered)
        raise SignInUnavailable(MISCONFIGURED)
    methods = data.get("token_endpoint_auth_methods_supported") or []
    meta = ProviderMetadata(
        issuer=issuer, algorithms=algorithms,
        auth_methods=tuple(m for m in methods if isinstance(m, str)) if isinstance(methods, list) else (),
        **endpoints,
    )
    _remember("metadata", provider.server_metadata_url, meta)
    return meta


async def provider_keys(client: httpx.AsyncClient, meta: ProviderMetadata, *, refresh: bool = False):
    """The provider's signing keys (a joserfc ``KeySet``); ``refresh`` after a key rotation."""
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    if not refresh:
        hit = _cached("jwks", meta.jwks_uri)
        if hit is not None:
            return hit
    data = await _get_json(client, meta.jwks_uri, "key set")
    keys = data.get("keys")
    if not isinstance(keys, list):
        raise SignInUnavailable(MISCONFIGURED)
    usable = [k for k in keys if isinstance(k, dict) and k.get("use", "sig") == "sig" and k.get("kty") != "oct"]
    try:
        key_set = KeySet.import_key_set({"keys": usable})
    except (JoseError, ValueError, TypeError) as exc:
        log.warning("provider key set at %s unusable: %s", meta.jwks_uri, exc)
        raise SignInUnavailable(MISCONFIGURED) from None
    if not key_set.keys:
        raise SignInUnavailable(MISCONFIGURED)
    _remember("jwks", meta.jwks_uri, key_set)
    return key_set


# --- the ID token ----------------------------------------------------------------


def token_header(id_token: object) -> dict:
    """The decoded JOSE header of a compact JWS, or SignInRejected."""
    if not isinstance(id_token, str) or len(id_token) > 16_384:
        raise SignInRejected(REJECTED)
    parts = id_token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise SignInRejected(REJECTED)  # not a signed JWT (unsigned, or encrypted)
    try:
        raw = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4))
        header = json.loads(raw)
    except (binascii.Error, ValueError):
        raise SignInRejected(REJECTED) from None
    if not isinstance(header, dict):
        raise SignInRejected(REJECTED)
    return header


def validate_id_token(
    id_token: str,
    *,
    keys,
    issuer: str,
    client_id: str,
    nonce: str,
    algorithms: Sequence[str] = ("RS256",),
    access_token: str | None = None,
    now: int | None = None,
    leeway: int = CLOCK_LEEWAY_SECONDS,
) -> dict:
    """Check an ID token from the token endpoint and return its claims.

    Signature against ``keys`` (the provider's JWKS) with an allowed asymmetric
    algorithm (``alg=none`` and HMAC are refused), ``iss`` equal to the metadata's
    issuer, ``aud`` containing our client id (``azp`` when several), ``exp``/``iat``
    (with ``leeway`` seconds of clock skew), and ``nonce`` equal to the one we sent.
    Anything else raises SignInRejected; the reason goes to the log only."""
    from authlib.oidc.core import CodeIDToken
    from joserfc import jwt
    from joserfc.errors import JoseError

    header = token_header(id_token)
    alg = header.get("alg")
    allowed = [a for a in algorithms if a in SAFE_ALGORITHMS]
    if not isinstance(alg, str) or alg not in allowed:
        log.warning("ID token refused: algorithm %r", alg)
        raise SignInRejected(REJECTED)
    if not id_token.rsplit(".", 1)[1]:
        raise SignInRejected(REJECTED)
    if not (isinstance(nonce, str) and nonce and isinstance(issuer, str) and issuer and client_id):
        raise SignInRejected(REJECTED)
    try:
        token = jwt.decode(id_token, keys, algorithms=[alg])
    except (JoseError, ValueError, TypeError) as exc:
        log.warning("ID token refused: %s", exc.__class__.__name__)
        raise SignInRejected(REJECTED) from None
    claims = CodeIDToken(
        token.claims,
        token.header,
        options={
            "iss": {"essential": True, "value": issuer},
            "sub": {"essential": True},
            "aud": {"essential": True, "value": client_id},
            "exp": {"essential": True},
            "iat": {"essential": True},
            "nonce": {"essential": True, "value": nonce},
        },
        params={"nonce": nonce, "client_id": client_id, "access_token": access_token},
    )
    try:
        claims.validate(now=now, leeway=leeway)
    except JoseError as exc:
        log.warning("ID token refused: %s", exc)
        raise SignInRejected(REJECTED) from None
    # Belt and braces over the library: the exact values, compared by us.
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    got_nonce = claims.get("nonce")
    if (
        claims.get("iss") != issuer
        or client_id not in audiences
        or not isinstance(got_nonce, str)
        or not hmac.compare_digest(got_nonce.encode(), nonce.encode())
        or not isinstance(claims.get("sub"), str)
        or not claims["sub"]
    ):
        raise SignInRejected(REJECTED)
    return dict(claims)


async def exchange_code(
    client: httpx.AsyncClient, provider: ProviderConfig, meta: ProviderMetadata, *, code: str, code_verifier: str,
    redirect_uri: str,
) -> dict:
    """Trade the authorization code (with the PKCE verifier) for tokens."""
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": code_verifier}
    headers = {"Accept": "application/json"}
    method = provider.token_endpoint_auth_method
    if method is None:
        offered = meta.auth_methods
        method = "client_secret_post" if offered and "client_secret_basic" not in offered and "client_secret_post" in offered else "client_secret_basic"
    if method == "client_secret_basic":  # RFC 6749 section 2.3.1: form-encode, then Base64
        pair = f"{quote(provider.client_id, safe='')}:{quote(provider.client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        data.update(client_id=provider.client_id, client_secret=provider.client_secret)
    try:
        response = await client.post(meta.token_endpoint, data=data, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("token endpoint of %s unreachable: %s", provider.name, exc.__class__.__name__)
        raise SignInUnavailable(UNREACHABLE) from None
    if response.status_code >= 500:
        log.warning("token endpoint of %s answered %s", provider.name, response.status_code)
        raise SignInUnavailable(UNREACHABLE)
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict) or "error" in body:
        error = body.get("error") if isinstance(body, dict) else None
        log.warning("token endpoint of %s refused the code: %s %r", provider.name, response.status_code, error)
        raise SignInRejected(REJECTED)
    if not isinstance(body.get("id_token"), str):
        log.warning("token endpoint of %s sent no id_token", provider.name)
        raise SignInRejected(REJECTED)
    return body


# --- small helpers -------------------------------------------------------------------


def _default_services():
    """The process's one Services (shared with the Streamlit pages)."""
    from personal_gpt.web.glue import services

    return services()


def _site_path(config: AuthConfig | None, path: str) -> str:
    """``path`` under the site's base path (whatever precedes /auth/callback in redirect_uri)."""
    base = ""
    if config is not None:
        base = urlsplit(config.redirect_uri).path[: -len(CALLBACK_PATH)].rstrip("/")
    return base + path


_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
}


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    """A small self-contained page; ``body`` is HTML the caller built from escaped parts."""
    text = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}"
        "a.button{display:block;margin:.6rem 0;padding:.7rem 1rem;border:1px solid #ccc;border-radius:.5rem;"
        "text-decoration:none;color:inherit}a.button:hover{background:#f4f4f4}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(text, status_code=status, headers=_SECURITY_HEADERS)


def _error_page(message: str, status: int, config: AuthConfig | None = None, retry: bool = True) -> HTMLResponse:
    home = html.escape(_site_path(config, "/"), quote=True)
    links = f'<p><a href="{home}">Back to the start page</a></p>'
    if retry:
        links = f'<p><a href="{html.escape(_site_path(config, "/auth/login"), quote=True)}">Try signing in again</a></p>' + links
    return _page("Sign-in", f"<p>{html.escape(message)}</p>{links}", status)


def _problem(exc: PersonalGptError, config: AuthConfig | None) -> HTMLResponse:
    status = exc.status if exc.status in (400, 403, 404, 503) else 503
    return _error_page(str(exc), status, config)


def _never_a_traceback(handler):
    """Anything unforeseen becomes the friendly page (and a log entry), never a 500."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:  # noqa: BLE001 - the last line of defence for a person's browser
            log.exception("sign-in route %s failed", request.url.path)
            return _error_page(UNAVAILABLE, 503)

    return guarded


def _load_config() -> AuthConfig | None:
    try:
        return load_auth_config()
    except InvalidInput as exc:
        log.error("sign-in settings: %s", exc)
        raise SignInUnavailable(MISCONFIGURED) from None


def _return_link_id(request: Request) -> str | None:
    """The share link the visitor came through: only from the signed ``pgpt_link``
    cookie the share route sets (checked by ``share_routes.shared_link_id``), never
    from the URL. An embed sign-in popup's signed return cookie wins (``emb_<hex>``)."""
    from personal_gpt.web.embed_routes import return_ref

    embed = return_ref(request.cookies)
    if embed is not None:
        return embed
    if not request.cookies.get(LINK_COOKIE):
        return None
    try:
        from personal_gpt.web.share_routes import shared_link_id

        link_id = shared_link_id(request.cookies)
    except ImportError:
        log.error("personal_gpt.web.share_routes is missing: the share link cannot survive sign-in")
        return None
    except Exception:  # noqa: BLE001 - an unreadable cookie (or cookie secret) is simply no link
        log.warning("the pgpt_link cookie could not be checked", exc_info=True)
        return None
    return link_id if isinstance(link_id, str) and _LINK_ID.fullmatch(link_id) else None


def _set_cookie(response: Response, config: AuthConfig, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", httponly=True, samesite="lax", secure=config.secure_cookies,
    )


def _new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False)  # honours HTTPS_PROXY / NO_PROXY


# --- the routes -----------------------------------------------------------------------


def _chooser(config: AuthConfig) -> HTMLResponse:
    items = "".join(
        f'<a class="button" href="login?{html.escape(urlencode({"provider": p.name}), quote=True)}">'
        f"Sign in with {html.escape(p.label)}</a>"
        for p in config.providers.values()
    )
    return _page("Sign in", f"<p>Choose how to sign in:</p>{items}")


def auth_routes(services: Callable[[], Any] | Any | None = None) -> list[Route]:
    """The ``/auth/login``, ``/auth/callback``, ``/auth/logout`` and ``/auth/me`` routes.
    ``services``: a Services instance or a zero-argument callable returning one
    (tests); by default the process's shared one from ``web/glue.py``."""
    if services is None:
        get_services = _default_services
    elif callable(services) and not hasattr(services, "begin_login"):
        get_services = services
    else:
        get_services = lambda: services  # noqa: E731

    async def login(request: Request) -> Response:
        config = None
        try:
            config = _load_config()
            if config is None:
                return _error_page(NOT_SET_UP, 503, retry=False)
            name = request.query_params.get("provider")
            if not name:
                if len(config.providers) > 1:
                    return _chooser(config)
                name = next(iter(config.providers))
            provider = config.provider(name)
            if provider is None:
                return _error_page(NO_SUCH_PROVIDER, 400, config)
            browser_id = request.cookies.get(BROWSER_COOKIE) or ""
            new_browser = not _BROWSER_ID.fullmatch(browser_id)
            if new_browser:
                browser_id = secrets.token_urlsafe(32)
            async with _new_client() as client:
                meta = await provider_metadata(client, provider)  # before any state is stored
            svc = get_services()
            state, nonce, verifier = await run_in_threadpool(
                svc.begin_login, provider.name, browser_id, _return_link_id(request)
            )
        except PersonalGptError as exc:
            return _problem(exc, config)
        from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
        from authlib.oauth2.rfc7636 import create_s256_code_challenge

        params = dict(provider.authorize_params)
        params.update(nonce=nonce, code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256")
        url = prepare_grant_uri(
            meta.authorization_endpoint, client_id=provider.client_id, response_type="code",
            redirect_uri=config.redirect_uri, scope=provider.scope, state=state, **params,
        )
        response = RedirectResponse(url, status_code=303, headers=_SECURITY_HEADERS)
        if new_browser:
            _set_cookie(response, config, BROWSER_COOKIE, browser_id, BROWSER_COOKIE_MAX_AGE)
        return response

    async def callback(request: Request) -> Response:
        config = None
        try:
            config = _load_config()
            if config is None:
                return _error_page(NOT_SET_UP, 503, retry=False)
            svc = get_services()
            query = request.query_params
            login_state = await run_in_threadpool(
                svc.finish_login, query.get("state") or "", request.cookies.get(BROWSER_COOKIE) or ""
            )
            if query.get("error"):
                log.info("provider refused sign-in: %r", query.get("error")[:100])
                return _error_page(CANCELLED, 400, config)
            code = query.get("code")
            provider = config.provider(login_state.provider)
            if not code or provider is None:
                return _error_page(REJECTED, 400, config)
            async with _new_client() as client:
                meta = await provider_metadata(client, provider)
                tokens = await exchange_code(
                    client, provider, meta, code=code, code_verifier=login_state.code_verifier,
                    redirect_uri=config.redirect_uri,
                )
                id_token = tokens["id_token"]
                kid = token_header(id_token).get("kid")
                keys = await provider_keys(client, meta)
                if kid is not None and kid not in {k.kid for k in keys.keys}:
                    keys = await provider_keys(client, meta, refresh=True)
            access = tokens.get("access_token")
            claims = validate_id_token(
                id_token, keys=keys, issuer=meta.issuer, client_id=provider.client_id, nonce=login_state.nonce,
                algorithms=meta.algorithms, access_token=access if isinstance(access, str) else None,
            )
            token = await run_in_threadpool(svc.sign_in, claims, provider.name)
        except PersonalGptError as exc:
            return _problem(exc, config)
        from personal_gpt.web.embed_routes import return_path

        target = return_path(login_state.return_link_id) or (SHARED_PATH if login_state.return_link_id else "/")
        response = RedirectResponse(_site_path(config, target), status_code=303, headers=_SECURITY_HEADERS)
        _set_cookie(response, config, SESSION_COOKIE, token, int(config.session_max_age.total_seconds()))
        return response

    async def logout(request: Request) -> Response:
        config = None
        try:
            config = load_auth_config()
        except InvalidInput:
            pass
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            try:
                await run_in_threadpool(get_services().sign_out, token)
            except PersonalGptError as exc:
                log.warning("sign-out: %s", exc)
        response = RedirectResponse(_site_path(config, "/"), status_code=303, headers=_SECURITY_HEADERS)
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=bool(config and config.secure_cookies)
        )
        return response

    async def me(request: Request) -> Response:
        try:
            found = await run_in_threadpool(principal_from_cookies, request.cookies, services=get_services)
        except Exception as exc:  # noqa: BLE001 - an answer without data, never a traceback
            if not isinstance(exc, PersonalGptError):
                log.exception("/auth/me failed")
            return JSONResponse({"error": UNAVAILABLE}, status_code=503, headers=_SECURITY_HEADERS)
        if found is None:
            return JSONResponse({"error": NOT_SIGNED_IN}, status_code=401, headers=_SECURITY_HEADERS)
        principal, signed_in_at = found
        return JSONResponse(
            {
                "issuer": principal.issuer, "subject": principal.subject, "email": principal.email,
                "email_verified": principal.email_verified, "name": principal.name,
                "signed_in_at": signed_in_at.isoformat(),
            },
            headers=_SECURITY_HEADERS,
        )

    return [
        Route("/auth/login", _never_a_traceback(login), methods=["GET"]),
        Route("/auth/callback", _never_a_traceback(callback), methods=["GET"]),
        Route("/auth/logout", _never_a_traceback(logout), methods=["GET", "POST"]),
        Route("/auth/me", me, methods=["GET"]),
    ]


def principal_from_cookies(
    cookies: Mapping[str, str], *, services: Callable[[], Any] | Any | None = None
) -> tuple[Principal, datetime] | None:
    """The signed-in person and when they signed in, from the request's cookies
    (``st.context.cookies`` in a page), or None: not signed in, session unknown,
    forged, revoked or expired, or sign-in not configured. A broken secrets file
    raises InvalidInput (show its sentence; do not fall back to the local creator)."""
    if load_auth_config() is None:
        return None
    try:
        token = cookies.get(SESSION_COOKIE)
    except Exception:  # noqa: BLE001 - not a mapping we can read: nobody
        return None
    if not isinstance(token, str) or not token:
        return None
    if services is None:
        svc = _default_services()
    elif callable(services) and not hasattr(services, "principal_for_session"):
        svc = services()
    else:
        svc = services
    return svc.principal_for_session(token)
