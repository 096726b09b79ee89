"""Starting the app: Streamlit's own command line, run in this process, on
``streamlit_app.py`` (pages + our HTTP routes on one port)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
APP = REPO_ROOT / "streamlit_app.py"


def serve(port: int, host: str) -> None:
    from streamlit.web import cli as streamlit_cli

    os.chdir(REPO_ROOT)  # uvicorn imports `streamlit_app:app` from here
    sys.argv = [
        "streamlit", "run", str(APP), "--server.port", str(port), "--server.address", host,
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
    ]
    sys.exit(streamlit_cli.main())
