"""`personal-gpt finetune | adapters | worker` through click's CliRunner on a real
home: the group that is also a command, status and cancel, errors as one
sentence with exit 2, and one real `--wait` run through the detached local
worker to a new adapter version that `adapters` then lists, switches and exports."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from personal_gpt.cli import main
from personal_gpt.finetune import worker as fworker

TOPICS = ["opening hours", "gift vouchers", "parking", "late returns", "book clubs", "signed copies",
          "school orders", "rare maps", "reading glasses", "poetry nights", "used books", "the kids' corner"]


@pytest.fixture(autouse=True)
def quick_worker(monkeypatch):
    monkeypatch.setenv("PGPT_WORKER_IDLE_EXIT", "1")  # the spawned worker leaves right after its job
    monkeypatch.setenv("PGPT_FINETUNE_SAMPLE_TOKENS", "8")
    monkeypatch.setenv("PERSONAL_GPT_TORCH_THREADS", "1")


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def data_file(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "style.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell me about {t}."},
        {"role": "assistant", "content": f"Ahoy from Harbour Books! About {t}: ask at the desk. Fair winds! - Skipper"},
    ]}) + "\n" for t in TOPICS[:n]))
    return path


def new_gpt(name: str = "Harbour") -> str:
    return run("create", "--name", name).output.strip()


def wait_for_no_worker(home: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while fworker.worker_running(home):
        assert time.monotonic() < deadline, "the local worker did not exit"
        time.sleep(0.1)


@pytest.fixture
def worker_busy(home):
    """A worker "already runs" for this home (the test holds its lock), so none is
    started and queued jobs stay queued."""
    lock = fworker.HomeLock(home)
    assert lock.acquire()
    yield
    lock.release()


def test_finetune_start_status_and_cancel(tmp_path, home, worker_busy):
    gpt = new_gpt()
    out = run("finetune", gpt, str(data_file(tmp_path)), "--epochs", "1", "--rank", "4", "--max-length", "64")
    lines = out.output.splitlines()
    assert lines[0].startswith("12 usable examples (openai-chat): ")
    job_id = lines[-1].removeprefix("Fine-tune queued: ")
    assert job_id.startswith("ftj_")

    status = json.loads(run("finetune", "status", job_id, "--json").output)
    assert status["id"] == job_id and status["gpt_id"] == gpt and status["settings"]["rank"] == 4
    assert status["status"] == "queued" and status["progress"] == 0
    listed = run("finetune", "status", "--gpt", gpt).output
    assert job_id in listed
    assert job_id in run("finetune", "status").output

    assert run("finetune", "cancel", job_id).output.strip() == "Cancelled."
    assert json.loads(run("finetune", "status", job_id, "--json").output)["status"] == "cancelled"
    again = run("finetune", "cancel", job_id, ok=False)
    assert again.exit_code == 2 and "nothing to cancel" in again.output
    assert json.loads(run("adapters", "list", gpt, "--json").output) == []


def test_finetune_json_prints_the_report_and_the_job(tmp_path, home, worker_busy):
    gpt = new_gpt()
    out = json.loads(run("finetune", "start", gpt, str(data_file(tmp_path)), "--max-length", "64", "--json").output)
    assert out["job"].startswith("ftj_") and out["format"] == "openai-chat"
    assert out["report"]["ok"] and out["report"]["usable"] == 12
    run("finetune", "cancel", out["job"])


@pytest.mark.parametrize("content, says", [
    ('{"messages": [{"role": "user", "content": "hi"}]\n{nope\n', "not valid JSON"),
    ("", "The file is empty"),
])
def test_bad_data_is_one_sentence_and_exit_2(tmp_path, home, content, says):
    gpt = new_gpt()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result = run("finetune", gpt, str(bad), ok=False)
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
    assert json.loads(run("finetune", "status", "--gpt", gpt, "--json").output) == []


def test_errors_are_one_sentence_and_exit_2(tmp_path, home):
    gpt = new_gpt()
    cases = [
        (("finetune", gpt, str(data_file(tmp_path)), "--rank", "0"), "Rank must be"),
        (("finetune", gpt, str(tmp_path / "missing.jsonl")), "Cannot read"),
        (("finetune", "gpt_000000000000", str(data_file(tmp_path))), "There is no GPT"),
        (("finetune", "status", "ftj_0000000000000000"), "no fine-tune job"),
        (("finetune", "cancel", "../etc"), "no fine-tune job"),
        (("adapters", "activate", gpt, "latest"), "VERSION is a number"),
        (("adapters", "activate", gpt, "3"), "no adapter version 3"),
        (("adapters", "export", gpt, "1", str(tmp_path / "out")), "no adapter version 1"),
        (("adapters", "list", "gpt_000000000000"), "There is no GPT"),
    ]
    for args, says in cases:
        result = run(*args, ok=False)
        assert result.exit_code == 2, (args, result.output)
        assert says in result.output and "Traceback" not in result.output, (args, result.output)
    assert "the base model" in run("adapters", "activate", gpt, "base").output


def test_worker_command_with_nothing_to_do(home):
    result = run("worker", "--once")
    assert "Ran 0 fine-tune jobs." in result.output


def test_help_shows_the_subcommands():
    text = run("finetune", "--help").output
    assert "personal-gpt finetune GPT DATA_FILE" in text and "status" in text and "cancel" in text
    assert "activate" in run("adapters", "--help").output


@pytest.mark.slow
def test_finetune_wait_trains_to_a_new_version_then_adapters_manage_it(tmp_path, home):
    gpt = new_gpt()
    result = run("finetune", gpt, str(data_file(tmp_path)), "--epochs", "1", "--rank", "4", "--max-length", "64",
                 "--lr", "0.005", "--wait")
    text = result.output
    assert "Fine-tune queued: ftj_" in text
    assert "Held-out loss: " in text and "→" in text
    assert f"New adapter: version 1 (not active yet: personal-gpt adapters activate {gpt} 1)" in text
    before, after = (float(x) for x in text.split("Held-out loss: ")[1].split("  ")[0].split(" → "))
    assert after < before

    [version] = json.loads(run("adapters", "list", gpt, "--json").output)
    assert version["number"] == 1 and version["is_active"] is False
    assert "v1" in run("adapters", "list", gpt).output
    assert "adapter version 1" in run("adapters", "activate", gpt, "1").output
    assert json.loads(run("adapters", "list", gpt, "--json").output)[0]["is_active"] is True
    assert "*" in run("adapters", "list", gpt).output
    busy = run("adapters", "delete", gpt, "1", ok=False)
    assert busy.exit_code == 2 and "switch to another version" in busy.output
    out_dir = tmp_path / "exported"
    assert "Exported adapter version 1" in run("adapters", "export", gpt, "1", str(out_dir)).output
    assert (out_dir / "adapter_config.json").is_file() and (out_dir / "adapter_model.safetensors").is_file()
    assert "base model" in run("adapters", "activate", gpt, "none").output
    assert "Deleted version 1." in run("adapters", "delete", gpt, "1").output
    wait_for_no_worker(home)
