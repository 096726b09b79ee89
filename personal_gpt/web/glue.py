"""Streamlit glue: the one cached Services per process, the acting Principal,
URL helpers and error display. Pages import this, never the store or models.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Iterator

import streamlit as st

from personal_gpt.auth import Principal
from personal_gpt.errors import PersonalGptError  # noqa: F401 (pages use glue.PersonalGptError)
from personal_gpt.markdown_safe import for_streamlit, plain  # noqa: F401 (pages use glue.plain)


_services = None
_services_lock = threading.Lock()


def services():
    """The one Services of this process (store, templates, loaded models), shared by
    every session and warmed at server start by ``warm_up``."""
    global _services
    if _services is None:
        with _services_lock:
            if _services is None:
                from personal_gpt.services import Services

                _services = Services()
    return _services


WARM_GPTS_ENV = "PGPT_WARM_GPTS"  # how many recently used GPTs to warm at start (0: none)
WARM_DELAY_S = 5.0  # after the first page had its chance to render without the model loading beside it


def warm_up() -> None:
    """Open the database and read the templates before the first visitor arrives; a few
    seconds later, compute the instructions of the GPTs chatted with last (``warm_models``)."""
    try:
        svc = services()
        svc.store
        svc.templates()
        svc.jobs.start()  # resume knowledge files a restart interrupted
        svc.start_privacy_cleanup()  # conversations past their GPT's retention: now, then hourly
    except PersonalGptError:
        return  # the first page shows the sentence
    try:
        count = int(os.environ.get(WARM_GPTS_ENV, "4"))
    except ValueError:
        count = 4
    if count > 0:
        time.sleep(WARM_DELAY_S)
        try:
            svc.warm_models(count)
        except PersonalGptError:
            pass


def explicit_navigation_only() -> None:
    """Streamlit switches to its old automatic multipage mode when a `pages/` folder
    sits beside the entry script, until some run calls st.navigation — so a first
    visit straight to /builder would get the automatic menu. Our navigation is
    always explicit (streamlit_app.py), so we say so before any session starts."""
    from streamlit.runtime.pages_manager import PagesManager

    if hasattr(PagesManager, "uses_pages_directory"):
        PagesManager.uses_pages_directory = False


@asynccontextmanager
async def lifespan(app):
    """Server start: explicit navigation; warm the services in the background while
    the server already answers."""
    explicit_navigation_only()
    threading.Thread(target=warm_up, name="personal-gpt-warm-up", daemon=True).start()
    yield


def signed_in() -> tuple[Principal, object] | None:
    """The person signed in on this browser (our session cookie, re-checked against the
    database on every run), or None. No sign-in configured: None."""
    from personal_gpt.web.oidc import principal_from_cookies

    try:
        return principal_from_cookies(st.context.cookies, services=services())
    except PersonalGptError as exc:  # a broken secrets file: say so, never fall back to the local creator
        st.error(str(exc), icon="⚠️")
        st.stop()


def sign_in_configured() -> bool:
    try:
        return services().auth_config is not None
    except PersonalGptError:
        return True  # configured, but broken: signed_in() shows the sentence


def sign_in_links(intro: str) -> None:
    """Links to each configured provider's sign-in. They must open in this tab (the
    provider sends the browser back here), so they are plain anchors with
    target=_self, built only from our own fixed paths and escaped labels."""
    import html
    from urllib.parse import quote

    config = services().auth_config
    st.markdown(intro)
    if config is None:
        st.info("Sign-in is not set up on this server yet (see docs/sign-in.md).", icon="🔒")
        return
    anchors = [
        f'<a href="/auth/login?provider={quote(name, safe="")}" target="_self" '
        f'style="display:inline-block;margin:0 .5rem .5rem 0;padding:.45rem 1rem;border-radius:.5rem;'
        f'border:1px solid rgba(128,128,128,.5);text-decoration:none">Sign in with {html.escape(p.label)}</a>'
        for name, p in config.providers.items()
    ]
    st.markdown(" ".join(anchors), unsafe_allow_html=True)


def sign_out_link(who: str) -> None:
    import html

    st.markdown(f'{html.escape(who)} · <a href="/auth/logout" target="_self">Sign out</a>', unsafe_allow_html=True)


def principal() -> Principal:
    """The acting creator. Without sign-in configured: the one local creator. With it:
    the signed-in person if they may create GPTs; otherwise a sign-in page (stops)."""
    if not sign_in_configured():
        return Principal.local()
    who = signed_in()
    if who is None:
        st.title("Personal GPTs")
        sign_in_links("Sign in to make and manage your GPTs.")
        st.stop()
    person, _ = who
    if not services().is_creator(person):
        st.title("Personal GPTs")
        st.info(f"You are signed in as {person.email or person.subject}, but this account cannot create GPTs "
                "here. If someone sent you a link, open that link again.", icon="🔒")
        sign_out_link(person.email or "Signed in")
        st.stop()
    return person


def share_visitor():
    """(link id, Visitor) for the client page, from the cookies the /s/<token> route set.
    The link id is None when this browser opened no link, and "" when it opened one
    whose URL has since been rotated."""
    from personal_gpt.sharing import Visitor
    from personal_gpt.web.share_routes import shared_link_ref, visitor_id

    cookies = st.context.cookies
    who = signed_in() if sign_in_configured() else None
    visitor = Visitor(principal=who[0] if who else None, signed_in_at=who[1] if who else None,
                      visitor_id=visitor_id(cookies) or "")
    ref = shared_link_ref(cookies)
    if ref is None:
        return None, visitor
    # "" = this browser opened the link through a URL that has since been rotated away
    return (ref[0] if services().share_link_current(*ref) else ""), visitor


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Show our errors as one sentence; never a traceback."""
    try:
        yield
    except PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")


def succeeded(action) -> bool:
    """Run ``action()``; on our error show its sentence and return False (so the
    caller does not rerun the page and wipe the message), else True."""
    try:
        action()
    except PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return False
    return True


def selected_gpt_id() -> str | None:
    value = st.query_params.get("gpt")
    return value or None


def avatar_for(avatar: str) -> str:
    """st.chat_message accepts an emoji or an image URL/data URI."""
    return avatar or "🤖"


def when(dt) -> str:
    try:
        return dt.astimezone().strftime("%d %b %Y, %H:%M")
    except Exception:  # noqa: BLE001 - display only
        return str(dt)


def gpt_header(avatar: str, name: str, description: str) -> None:
    """The GPT's avatar (emoji or image), name and one-line description atop a chat."""
    head = st.columns([1, 12])
    if avatar.startswith("data:"):
        head[0].image(avatar, width=56)
    else:
        head[0].markdown(f"# {avatar or '🤖'}")
    head[1].title(plain(name))
    if description:
        head[1].caption(for_streamlit(description))


def show_sources(citations: list[dict]) -> None:
    """Where an answer came from: file and page, the evidence sentence, then the
    passage it sits in (all as plain text: knowledge files are untrusted)."""
    if not citations:
        return
    with st.expander(f"Sources ({len(citations)})"):
        for c in citations:
            where = c.get("file", "") + (f", page {c['page']}" if c.get("page") else "")
            st.caption(f"[{c.get('n')}] {where}")
            sentence, passage = c.get("text", ""), c.get("passage")
            st.text(f"“{sentence}”" if passage and sentence != passage else sentence)
            if passage and sentence != passage:
                st.caption("In the passage:")
                st.text(passage)


def show_messages(messages, avatar: str, feedback: dict | None = None, on_rate=None, key: str = "fb") -> None:
    """Past turns as safe Markdown (markdown_safe.for_streamlit; st.markdown shows raw HTML as text).
    With ``on_rate(message_id, rating, comment)``, every answer gets thumbs and a comment
    (``feedback``: the saved ratings by message id)."""
    for m in messages:
        with st.chat_message(m.role, avatar=avatar_for(avatar) if m.role == "assistant" else None):
            st.markdown(for_streamlit(m.content))
            if m.role == "assistant":
                meta = m.meta or {}
                if meta.get("finish_reason") == "cancelled":
                    st.caption("Stopped.")
                show_sources(meta.get("citations") or [])
                if on_rate is not None and getattr(m, "id", None):
                    feedback_box(m.id, (feedback or {}).get(m.id), on_rate, key)


def feedback_box(message_id: int, saved, on_rate, key: str = "fb") -> None:
    """Thumbs up/down under an answer (saved at once) and, once rated, an optional comment.
    ``saved``: the stored rating (anything with ``rating`` and ``comment``) or None;
    ``on_rate(message_id, rating, comment)`` stores it (1 or -1)."""
    stored = getattr(saved, "rating", None)
    value = st.feedback("thumbs", key=f"{key}-{message_id}", default=None if stored is None else int(stored == 1))
    if value is None:
        return
    rating = 1 if value == 1 else -1
    comment = getattr(saved, "comment", "") or ""
    if rating != stored:
        if not succeeded(lambda: on_rate(message_id, rating, comment)):
            return
        st.toast("Thanks for your feedback.", icon="🙏")
    with st.popover("Comment" if not comment else "Edit comment", icon="💬"):
        with st.form(f"{key}-c-{message_id}", border=False):
            text = st.text_area("What was good or wrong about this answer? (optional)", value=comment,
                                max_chars=1000, key=f"{key}-ct-{message_id}")
            if st.form_submit_button("Send comment"):
                if succeeded(lambda: on_rate(message_id, rating, text)):
                    st.toast("Thanks — your comment was saved.", icon="🙏")


def stream_turn(send, message: str, avatar: str) -> bool:
    """Show the person's message, then stream the answer from ``send(message)``.

    Returns True when an answer was produced; a PersonalGptError is shown as one
    sentence instead.
    """
    with st.chat_message("user"):
        st.markdown(for_streamlit(message))
    try:
        with st.spinner("Thinking… (the first answer also loads the model)"):
            reply = send(message)
    except PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return False
    with st.chat_message("assistant", avatar=avatar_for(avatar)):
        try:
            stream_markdown(reply.pieces)
        except PersonalGptError as exc:
            st.error(str(exc), icon="⚠️")
            return False
        show_sources(reply.citations)
    return True


def stream_markdown(pieces: Iterator[str], every_s: float = 0.05) -> str:
    """``st.write_stream`` for model output, made safe: the text so far is shown through
    ``for_streamlit`` (write_stream would render the raw text as Markdown), redrawn at most
    every ``every_s`` seconds (less often for long answers: never more than a third of the
    time goes to redrawing). A stop (Streamlit ends the script at a redraw) closes the
    stream, so the chat path saves the partial answer as cancelled. Returns the text."""
    import time

    box = st.empty()
    text, shown, drawn, wait = "", "", 0.0, every_s
    try:
        for piece in pieces:
            text += piece
            if time.monotonic() - drawn >= wait:
                started = time.monotonic()
                box.markdown(for_streamlit(text))
                shown, drawn = text, time.monotonic()
                wait = max(every_s, 2 * (drawn - started))
        if text != shown:
            box.markdown(for_streamlit(text))
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    return text


def pick_gpt(title: str, gpts, label: str, empty: str, empty_icon: str) -> None:
    """The page opened without ?gpt=…: an empty state, or a picker that sets it. Stops the page."""
    st.title(title)
    if not gpts:
        st.info(empty, icon=empty_icon)
        st.page_link("pages/my_gpts.py", label="Go to My GPTs", icon="🏠")
        st.stop()
    choice = st.selectbox(label, gpts, format_func=lambda g: f"{g.avatar} {g.name}", index=None)
    if choice is not None:
        st.query_params["gpt"] = choice.id
        st.rerun()
    st.stop()


def not_found(title: str, exc: PersonalGptError) -> None:
    """The page's GPT cannot be shown: one sentence and a way back. Stops the page."""
    st.title(title)
    st.error(str(exc), icon="⚠️")
    st.page_link("pages/my_gpts.py", label="Back to My GPTs", icon="🏠")
    st.stop()
