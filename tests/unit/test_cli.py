"""The `personal-gpt` command: every subcommand, its --json output, and one-sentence
errors with exit code 2 (never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from personal_gpt.cli import main


@pytest.fixture
def run():
    runner = CliRunner()

    def _run(*args, ok=True):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output + result.stderr
        return result

    return _run


SUPPORT = ["--template", "customer-support", "--name", "Bloom helper", "--set", "business_name=Bloom & Branch",
           "--set", "what_you_sell=flowers", "--set", "contact=hello@bloom.example"]


def test_templates_lists_every_template(run):
    out = run("templates").output
    assert "customer-support" in out and "blanks: business_name" in out
    data = json.loads(run("templates", "--json").output)
    assert len(data) >= 10 and {"id", "name", "description", "icon", "blanks"} <= set(data[0])


def test_create_list_show_publish(run):
    gpt_id = run("create", *SUPPORT).output.strip()
    assert gpt_id.startswith("gpt_")
    listed = json.loads(run("list", "--json").output)
    assert [g["id"] for g in listed] == [gpt_id] and listed[0]["published_version"] is None
    shown = json.loads(run("show", gpt_id, "--json").output)
    assert shown["name"] == "Bloom helper" and "Bloom & Branch" in shown["instructions"]
    assert "Bloom & Branch" in run("show", gpt_id).output
    assert run("publish", gpt_id).output.strip() == "Published Bloom helper v1."
    assert "published v1" in run("list").output


def test_empty_list_says_how_to_start(run):
    assert "No GPTs yet" in run("list").output


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "gpt_000000000000"], "Error: There is no GPT with that id.\n"),
        (["publish", "nope"], "Error: There is no GPT with that id.\n"),
        (["ask", "gpt_123456789abc", "hi"], "Error: There is no GPT with that id.\n"),
        (["create", "--template", "customer-support"], "Error: Fill in: Business name, What you sell, How to reach a person.\n"),
        (["create", "--template", "nope"], "Error: There is no template called 'nope'.\n"),
        (["create"], "Error: Give a --template to start from, or a --name for a blank GPT.\n"),
        (["create", "--name", "x", "--set", "novalue"], "Error: --set takes blank=value, got 'novalue'.\n"),
        (["create", "--template", "customer-support", "--set", "colour=red"], "Error: "),
    ],
)
def test_errors_are_one_sentence_and_exit_2(run, args, message):
    result = run(*args, ok=False)
    assert result.exit_code == 2
    assert result.stderr.startswith(message)
    assert "Traceback" not in result.output


def test_duplicate_name_is_refused(run):
    run("create", "--name", "Coach")
    result = run("create", "--name", "coach", ok=False)
    assert result.exit_code == 2 and "already have a GPT called 'coach'" in result.stderr
    assert len(json.loads(run("list", "--json").output)) == 1


def test_corrupt_database_gives_a_sentence(run, home):
    (home / "personal-gpt.db").write_bytes(b"not a database" * 50)
    result = run("list", ok=False)
    assert result.exit_code == 2
    assert "is damaged or is not a Personal GPTs database" in result.stderr


@pytest.mark.slow
def test_ask_json_with_the_real_bundled_model(home):
    """A separate process, as a script would run it, on the real model."""
    env = {**os.environ}
    cli = [sys.executable, "-m", "personal_gpt.cli"]
    gpt_id = subprocess.run(
        [*cli, "create", "--name", "Geo", "--json"], env=env, capture_output=True, text=True, check=True
    )
    gpt_id = json.loads(gpt_id.stdout)["id"]
    out = subprocess.run([*cli, "ask", gpt_id, "What is the capital of France?", "--json"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "Paris" in data["answer"]
    assert data["model"].startswith("SmolLM2-135M-Instruct")
    assert data["timings"]["first_token_s"] > 0 and data["timings"]["total_s"] >= data["timings"]["first_token_s"]
    assert data["usage"]["completion_tokens"] > 0
    plain = subprocess.run([*cli, "ask", gpt_id, "What is the capital of France?"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert "Paris" in plain.stdout


def test_knowledge_add_list_search_remove(run, tmp_path):
    gpt_id = run("create", "--name", "Shop").output.strip()
    (tmp_path / "hours.txt").write_text("Our shop opens Monday to Saturday from 9am to 5pm. Closed on Sundays.")
    (tmp_path / "empty.txt").write_bytes(b"")
    result = run("knowledge", "add", gpt_id, str(tmp_path / "hours.txt"), str(tmp_path / "empty.txt"), "--json",
                 ok=False)
    assert result.exit_code == 1, "a rejected file makes the exit code non-zero"
    outcome = {item["name"]: item for item in json.loads(result.output)}
    assert outcome["hours.txt"]["status"] == "ready" and outcome["hours.txt"]["chunks"] >= 1
    assert outcome["empty.txt"] == {"name": "empty.txt", "status": "rejected", "error": "The file is empty."}
    listed = json.loads(run("knowledge", "list", gpt_id, "--json").output)
    assert [f["name"] for f in listed] == ["hours.txt"]
    hits = json.loads(run("search", gpt_id, "When are you closed?", "-k", "3", "--json").output)
    assert hits[0]["file"] == "hours.txt" and hits[0]["rank"] == 1 and "Sundays" in hits[0]["text"]
    assert "hours.txt" in run("search", gpt_id, "Sundays").output
    run("knowledge", "remove", gpt_id, listed[0]["id"])
    assert json.loads(run("knowledge", "list", gpt_id, "--json").output) == []
    result = run("knowledge", "remove", gpt_id, listed[0]["id"], ok=False)
    assert result.exit_code == 2 and "There is no knowledge file with that id" in result.stderr
