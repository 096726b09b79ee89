"""The test harness itself: fixtures start real things, the scripts parse, and
scripts/test.sh never lets "no tests collected" pass."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.server import running_app_server

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["scripts/setup.sh", "scripts/start.sh", "scripts/test.sh", "scripts/pg.sh", ".ci/run"]


def test_home_is_isolated(home, model_cache):
    assert os.environ["PERSONAL_GPT_HOME"] == str(home)
    assert home.is_dir() and not any(home.iterdir())
    assert os.environ["PERSONAL_GPT_MODEL_CACHE"] == str(model_cache)
    assert "PERSONAL_GPT_DATABASE_URL" not in os.environ
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    # sign-in settings are the test's own (none by default), never the developer's ~/.streamlit/secrets.toml
    assert "[auth]" not in Path(os.environ["PERSONAL_GPT_SECRETS"]).read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    path = REPO_ROOT / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(path, os.X_OK), f"{script} is not executable"


def test_postgres_url_connects(postgres_url):
    import psycopg

    assert postgres_url.startswith("postgresql+psycopg://")
    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.dbname == "personal_gpt_test"


def test_browser_renders_a_page(page):
    page.goto("data:text/html,<h1>hi</h1>")
    assert page.locator("h1").inner_text() == "hi"


def test_app_server_helper_starts_waits_and_stops(home, tmp_path):
    app = tmp_path / "tiny_app.py"
    app.write_text("import os\nimport streamlit as st\nst.write(os.environ['PERSONAL_GPT_HOME'])\n")
    with running_app_server(home, app=app, log_dir=tmp_path) as server:
        import urllib.request

        with urllib.request.urlopen(server.url + "/_stcore/health", timeout=5) as response:
            assert response.status == 200
        assert server.process.poll() is None
    assert server.process.poll() is not None
    assert f"URL: {server.url}" in server.output()


def test_app_server_helper_reports_a_crash(home, tmp_path):
    with pytest.raises(RuntimeError, match="exited with code 3"):
        with running_app_server(home, command=[sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                                log_dir=tmp_path, timeout=20):
            pass


@pytest.fixture
def scratch_repo(tmp_path):
    """A copy of scripts/test.sh in an otherwise tiny repo with one test file."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    shutil.copy2(REPO_ROOT / "scripts" / "lib.sh", repo / "scripts" / "lib.sh")
    (repo / "pytest.ini").write_text("[pytest]\n")
    (repo / "test_sample.py").write_text(textwrap.dedent("""
        import os

        def test_passes():
            assert os.environ["HF_HUB_OFFLINE"] == "1"

        def test_fails_on_request():
            assert os.environ.get("SAMPLE_FAIL") != "1"
    """))
    return repo


def run_test_sh(repo, *args, **extra_env):
    env = dict(os.environ)
    env.update(
        PGPT_VENV=sys.prefix,  # the venv running this test; setup is skipped
        PGPT_SKIP_SETUP="1",
        PGPT_SKIP_SYSTEM_PACKAGES="1",
        PERSONAL_GPT_TEST_POSTGRES_URL="postgresql+psycopg://unused@127.0.0.1:1/none",
        CI="true",
        **extra_env,
    )
    return subprocess.run(
        ["bash", str(repo / "scripts" / "test.sh"), *args, "-p", "no:cacheprovider"],
        cwd=repo, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )


def test_test_sh_passes_pytest_success_through(scratch_repo):
    result = run_test_sh(scratch_repo, "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_test_sh_passes_pytest_failure_through(scratch_repo):
    result = run_test_sh(scratch_repo, "-q", SAMPLE_FAIL="1")
    assert result.returncode == 1, result.stdout + result.stderr


def test_test_sh_fails_when_no_tests_are_collected(scratch_repo):
    result = run_test_sh(scratch_repo, "-q", "-k", "no_such_test_anywhere")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "collected no tests" in result.stderr


def test_test_sh_exit_code_mapping():
    for rc in (0, 1, 2, 5):
        result = subprocess.run(
            ["bash", "-c", f'source "{REPO_ROOT}/scripts/test.sh"; map_exit_code {rc}'],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == rc
        assert ("collected no tests" in result.stderr) == (rc == 5)
