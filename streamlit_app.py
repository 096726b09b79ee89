"""Entry point: Streamlit pages and our HTTP routes in one process, one port.

`streamlit run streamlit_app.py` (or `personal-gpt serve`) finds ``app``; when
Streamlit runs this file as the page script, it builds the navigation.
"""

from streamlit.starlette import App

from personal_gpt.web.glue import lifespan
from personal_gpt.web.routes import routes

app = App(__file__, routes=routes(), lifespan=lifespan)

if __name__ == "__main__":
    from urllib.parse import urlsplit

    import streamlit as st

    st.set_page_config(page_title="Personal GPTs", page_icon="🤖", layout="wide")
    shared = st.Page("pages/shared.py", title="Chat", icon="💬", url_path="shared", visibility="hidden")
    pages = [
        st.Page("pages/my_gpts.py", title="My GPTs", icon="🏠", default=True, url_path="gpts"),
        st.Page("pages/builder.py", title="Builder", icon="🛠️", url_path="builder"),
        st.Page("pages/chat.py", title="Chat", icon="💬", url_path="chat"),
        st.Page("pages/conversations.py", title="Conversations", icon="🗂️", url_path="conversations"),
        st.Page("pages/analytics.py", title="Analytics", icon="📊", url_path="analytics"),
        st.Page("pages/settings.py", title="Settings", icon="⚙️", url_path="settings"),
        shared,  # a client who came through /s/<token>: listed (so /shared is found) but never shown
    ]
    client_view = urlsplit(st.context.url or "").path.rstrip("/").endswith("/shared")
    st.navigation(pages, position="hidden" if client_view else "sidebar").run()
