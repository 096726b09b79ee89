"""Start the real Personal GPTs app as a subprocess on 127.0.0.1 and wait for it.

Used by the ``live_server`` fixture (tests/conftest.py) and by benchmarks:

    from support.server import running_app_server      # tests/ on sys.path
    with running_app_server(home) as server:
        httpx.get(server.url + "/_stcore/health")

It owns process start, readiness and teardown only; it knows nothing about pages.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_APP = REPO_ROOT / "streamlit_app.py"
HEALTH_PATH = "/_stcore/health"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(port: int, app: Path = DEFAULT_APP, python: str = sys.executable) -> list[str]:
    """The command line that serves ``app`` on 127.0.0.1:``port``."""
    return [
        python, "-m", "streamlit", "run", str(app),
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]


@dataclass
class AppServer:
    url: str
    port: int
    home: Path
    process: subprocess.Popen
    log_path: Path

    def output(self, limit: int = 20_000) -> str:
        """The server's combined stdout/stderr so far (the last ``limit`` characters)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if len(text) <= limit else "...\n" + text[-limit:]

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server; kill it if it is still running after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_app_server(
    home: Path,
    *,
    port: int | None = None,
    app: Path = DEFAULT_APP,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    timeout: float = 60.0,
) -> AppServer:
    """Start the app with ``PERSONAL_GPT_HOME=home`` and return once it is healthy.

    ``command`` replaces the default ``streamlit run`` line (it must serve on
    ``port``). Raises RuntimeError, with the server's output, if the process
    exits or the health check does not answer 200 within ``timeout`` seconds.
    """
    port = port or free_port()
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.update({
        "PERSONAL_GPT_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    fd, log_name = tempfile.mkstemp(prefix=f"pgpt-server-{port}-", suffix=".log", dir=log_dir)
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(
            list(command or server_command(port, app)),
            cwd=REPO_ROOT,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = AppServer(url=f"http://127.0.0.1:{port}", port=port, home=home, process=process, log_path=log_path)
    try:
        _wait_healthy(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_healthy(server: AppServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    health = server.url + HEALTH_PATH
    while True:
        code = server.process.poll()
        if code is not None:
            raise RuntimeError(f"app server exited with code {code} before it was healthy.\n{server.output()}")
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"app server not healthy at {health} after {timeout:.0f} s.\n{server.output()}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_app_server(home: Path, **kwargs) -> Iterator[AppServer]:
    """``start_app_server`` as a context manager that always stops the server."""
    server = start_app_server(home, **kwargs)
    try:
        yield server
    finally:
        server.stop()
