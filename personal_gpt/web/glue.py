"""Streamlit glue: the one cached Services per process, the acting Principal,
URL helpers and error display. Pages import this, never the store or models.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager, contextmanager
from typing import Iterator

import streamlit as st

from personal_gpt.auth import Principal
from personal_gpt.errors import PersonalGptError  # noqa: F401 (pages use glue.PersonalGptError)


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


def warm_up() -> None:
    """Open the database and read the templates before the first visitor arrives."""
    try:
        svc = services()
        svc.store
        svc.templates()
        svc.jobs.start()  # resume knowledge files a restart interrupted
    except PersonalGptError:
        pass  # the first page shows the sentence


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


def principal() -> Principal:
    """The local creator (sign-in arrives with share links and accounts)."""
    return Principal.local()


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Show our errors as one sentence; never a traceback."""
    try:
        yield
    except PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")


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


def show_sources(citations: list[dict]) -> None:
    """Where an answer came from: file and page, and the passage itself (as plain text)."""
    if not citations:
        return
    with st.expander(f"Sources ({len(citations)})"):
        for c in citations:
            where = c.get("file", "") + (f", page {c['page']}" if c.get("page") else "")
            st.caption(f"[{c.get('n')}] {where}")
            st.text(c.get("text", ""))


def show_messages(messages, avatar: str) -> None:
    """Past turns. Text goes through st.markdown, which never renders raw HTML."""
    for m in messages:
        with st.chat_message(m.role, avatar=avatar_for(avatar) if m.role == "assistant" else None):
            st.markdown(m.content)
            if m.role == "assistant":
                meta = m.meta or {}
                if meta.get("finish_reason") == "cancelled":
                    st.caption("Stopped.")
                show_sources(meta.get("citations") or [])


def stream_turn(send, message: str, avatar: str) -> bool:
    """Show the person's message, then stream the answer from ``send(message)``.

    Returns True when an answer was produced; a PersonalGptError is shown as one
    sentence instead.
    """
    with st.chat_message("user"):
        st.markdown(message)
    try:
        with st.spinner("Thinking… (the first answer also loads the model)"):
            reply = send(message)
    except PersonalGptError as exc:
        st.error(str(exc), icon="⚠️")
        return False
    with st.chat_message("assistant", avatar=avatar_for(avatar)):
        try:
            st.write_stream(reply.pieces)
        except PersonalGptError as exc:
            st.error(str(exc), icon="⚠️")
            return False
        show_sources(reply.citations)
    return True


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
