"""Shared fixtures: an isolated PERSONAL_GPT_HOME per test, one bundled-model
cache per run, a throw-away PostgreSQL, headless Chromium and the live app.

Fixtures start real components (no fakes here); fakes belong at the ChatModel
seam in the tests that want them.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # make `support` importable whatever the import mode
    sys.path.insert(0, str(TESTS_DIR))

from support.server import AppServer, start_app_server  # noqa: E402
os.environ["PERSONAL_GPT_LOCAL_BACKEND"] = "torch"  # the torch path, as in CI; test_llamacpp_backend.py opts in
os.environ["PGPT_WARM_GPTS"] = "0"  # servers started by tests do not warm models at start (test_chat_real tests warm_models)

PG_SCRIPT = REPO_ROOT / "scripts" / "pg.sh"
RESULTS_DIR = REPO_ROOT / "test-results"

# Without the background-networking flags Chromium's own connections are
# refused by a closed network and slow every page down.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_executable() -> str:
    """PGPT_CHROMIUM, else Debian's /usr/bin/chromium (Chromium.app on macOS)."""
    if os.environ.get("PGPT_CHROMIUM"):
        return os.environ["PGPT_CHROMIUM"]
    if platform.system() == "Darwin":
        return "/Applications/Chromium.app/Contents/MacOS/Chromium"
    return "/usr/bin/chromium"


# --- reports: let fixtures know whether the test failed --------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    server = getattr(item, "_pgpt_live_server", None)
    if server is not None and report.failed and report.when in ("setup", "call"):
        report.sections.append((f"live_server output ({server.url})", server.output()))


def _failed(request) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


# --- isolation -------------------------------------------------------------

@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The bundled-model cache shared by every test of this run, so the GGUF ->
    safetensors conversion happens once. PERSONAL_GPT_MODEL_CACHE, if already
    set, wins (point it at a lasting folder to skip the conversion across runs).
    Exposed to tests and servers through the env var by ``home``."""
    preset = os.environ.get("PERSONAL_GPT_MODEL_CACHE")
    if preset:
        path = Path(preset)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch, model_cache) -> Path:
    """A fresh PERSONAL_GPT_HOME for every test; SQLite by default, offline HF."""
    path = tmp_path / "personal-gpt-home"
    path.mkdir()
    monkeypatch.setenv("PERSONAL_GPT_HOME", str(path))
    monkeypatch.setenv("PERSONAL_GPT_MODEL_CACHE", str(model_cache))
    monkeypatch.delenv("PERSONAL_GPT_DATABASE_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # hermetic sign-in settings: none, unless a test writes its own secrets file
    no_auth = tmp_path / "no-sign-in-secrets.toml"
    no_auth.write_text("# sign-in not configured in tests (no auth section)\n", encoding="utf-8")
    monkeypatch.setenv("PERSONAL_GPT_SECRETS", str(no_auth))
    return path


# --- PostgreSQL --------------------------------------------------------------

def _no_postgres(reason: str):
    if os.environ.get("PGPT_ALLOW_NO_POSTGRES") == "1":
        pytest.skip(f"PostgreSQL unavailable (PGPT_ALLOW_NO_POSTGRES=1): {reason}")
    pytest.fail(
        "PostgreSQL tests need a server: run them through `bash scripts/test.sh`, or set "
        "PERSONAL_GPT_TEST_POSTGRES_URL, or install PostgreSQL (apt-get install postgresql / "
        "brew install postgresql@15) so scripts/pg.sh can start one. "
        f"Set PGPT_ALLOW_NO_POSTGRES=1 to skip these tests instead.\n{reason}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def postgres_url():
    """A SQLAlchemy URL (postgresql+psycopg://...) to an empty test database.

    PERSONAL_GPT_TEST_POSTGRES_URL when set (scripts/test.sh sets it); else a
    cluster started with scripts/pg.sh for this session and stopped after it.
    Tests share the database: create what you need under unique names."""
    url = os.environ.get("PERSONAL_GPT_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    try:
        started = subprocess.run(
            ["bash", str(PG_SCRIPT), "start"], capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _no_postgres(f"scripts/pg.sh start: {exc}")
    if started.returncode != 0:
        _no_postgres(f"scripts/pg.sh start failed:\n{started.stderr.strip()}")
    exports = dict(
        re.match(r"export (\w+)=(.*)", line).groups()
        for line in started.stdout.splitlines() if line.startswith("export ")
    )
    exports = {key: shlex.split(value)[0] for key, value in exports.items()}
    try:
        yield exports["PERSONAL_GPT_TEST_POSTGRES_URL"]
    finally:
        subprocess.run(
            ["bash", str(PG_SCRIPT), "stop", exports["PGPT_PG_DIR"]],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )


# --- browser -----------------------------------------------------------------

@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Playwright sync API, the system chromium; never
    `playwright install`). One per session; use ``page`` for isolation."""
    executable = chromium_executable()
    if not os.path.exists(executable):
        pytest.fail(
            f"Chromium not found at {executable}. Install it (Debian/Ubuntu: apt-get install chromium; "
            "macOS: brew install --cask chromium) or set PGPT_CHROMIUM to its executable.",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, request):
    """A page in a fresh browser context (no shared cookies/storage). On failure
    a screenshot goes to test-results/<test>.png."""
    context = browser.new_context()
    new_page = context.new_page()
    new_page.set_default_timeout(30_000)
    try:
        yield new_page
    finally:
        if _failed(request):
            RESULTS_DIR.mkdir(exist_ok=True)
            name = re.sub(r"[^\w.-]+", "_", request.node.nodeid)[-150:]
            try:
                new_page.screenshot(path=str(RESULTS_DIR / f"{name}.png"), full_page=True)
            except Exception:  # the page may be gone; the failure already says why
                pass
        context.close()


# --- the app -------------------------------------------------------------------

@pytest.fixture
def live_server(home, request, tmp_path) -> AppServer:
    """The real app in a subprocess on a free 127.0.0.1 port, serving this
    test's ``home``. Function-scoped because each test has its own home.
    Yields an AppServer (url, port, home, process, output()); stopped after the
    test; its output is attached to the report when the test fails."""
    server = start_app_server(home, log_dir=tmp_path)
    request.node._pgpt_live_server = server
    try:
        yield server
    finally:
        server.stop()
