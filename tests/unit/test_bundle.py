"""Export and import of a whole GPT as one bundle, on real SQLite homes: the round trip keeps
behaviour (same spec and versions, same top knowledge passage with the real embedder, same
greedy answer of the real bundled model with a real peft LoRA active), an import always makes
a NEW GPT, a failure midway leaves nothing behind, an adapter for a model this home cannot
load is skipped with a sentence, save-as-template renders back, and the CLI end to end."""

from __future__ import annotations

import errno
import json
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from personal_gpt.auth import Principal
from personal_gpt.bundle import FORMAT, FORMAT_VERSION, MANIFEST
from personal_gpt.config import Settings
from personal_gpt.errors import Conflict, InvalidInput
from personal_gpt.finetune.data import Example
from personal_gpt.services import Services
from personal_gpt.store import bundles as bstore
from personal_gpt.store import finetune as fstore
from personal_gpt.store.schema import metadata
from personal_gpt.templates import load_templates, render
from tests.support.fake_model import FakeRegistry

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BUNDLED = "bundled:smollm2-135m-instruct"

PRICES = b"""# Harbour Books price list

## Gift vouchers
Gift vouchers come in 10, 25 and 50 pound amounts and never expire.

## Delivery
Delivery in Whitby costs 3 pounds and is free for orders over 30 pounds.
"""
HOURS = b"Harbour Books opens Tuesday to Sunday from 10am to 6pm. We are closed on Mondays."
QUESTION = "When are you closed?"


# --- helpers -----------------------------------------------------------------------------

def other_home(tmp_path: Path, monkeypatch, name: str = "home-b") -> Path:
    """A second PERSONAL_GPT_HOME (another install) for the importing Services."""
    path = tmp_path / name
    path.mkdir()
    monkeypatch.setenv("PERSONAL_GPT_HOME", str(path))
    return path


def services(models=None) -> Services:
    return Services(Settings.from_env(), models=models)


def snapshot(svc: Services) -> tuple[list[str], dict[str, int]]:
    """Every file under the home (the database's own files aside) and every table's row count."""
    files = sorted(str(p.relative_to(svc.settings.home)) for p in svc.settings.home.rglob("*")
                   if not p.name.startswith("personal-gpt.db"))
    with svc.store.read() as conn:
        rows = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in metadata.sorted_tables}
    return files, rows


def make_lora(settings: Settings, folder: Path) -> Path:
    """A real peft LoRA on the bundled weights, A and B seeded random (so answers change, the same way
    every run: peft draws A from the global generator, which left the answer unchanged in one CI run)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from personal_gpt.models.bundled import BUNDLED_ID, ensure_bundled_model

    ensure_bundled_model(settings)
    base = AutoModelForCausalLM.from_pretrained(settings.model_cache_dir / BUNDLED_ID, dtype=torch.float32,
                                                local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.peft_config["default"].base_model_name_or_path = BUNDLED
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def publish_adapter(svc: Services, gpt_id: str, source: Path, base: str = BUNDLED, active: bool = True) -> int:
    """Publish an adapter folder as the GPT's next version, the way the worker does."""
    import shutil

    adapter_id = fstore.new_adapter_id()
    folder = svc.settings.home / "gpts" / gpt_id / "adapters" / adapter_id
    shutil.copytree(source, folder)
    with svc.store.tx() as conn:
        number = fstore.insert_adapter(conn, gpt_id, adapter_id=adapter_id, job_id=None, base_model=base,
                                       path=folder.relative_to(svc.settings.home).as_posix(),
                                       settings={"rank": 4, "epochs": 1}, data_summary={"train": 12},
                                       metrics={"eval_loss_before": 2.5, "eval_loss_after": 1.9},
                                       samples=[{"prompt": "Hi", "before": "a", "after": "b"}])
        if active:
            fstore.set_active(conn, gpt_id, number)
    return number


def fake_peft_folder(folder: Path, base: str) -> Path:
    from safetensors.numpy import save_file
    import numpy as np

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                            "base_model_name_or_path": base}))
    save_file({"x": np.zeros((1,), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder


def build_gpt(svc: Services, *, name: str = "Harbour Books", ingest: bool = True) -> str:
    """A GPT with two versions (the first published), knowledge, a share link of each kind,
    embed and privacy settings, a correction and a fine-tuning data set."""
    gpt = svc.create_gpt(ALICE, spec={
        "name": name, "description": "Answers questions about Harbour Books.", "avatar": "📚",
        "instructions": "You answer questions about Harbour Books, a bookshop in Whitby. Keep answers short.",
        "starters": ["What are your opening hours?", "Do you sell gift vouchers?"],
        "generation": {"temperature": 0.0, "max_new_tokens": 12, "repetition_penalty": 1.0},
    })
    svc.publish(ALICE, gpt.id)
    spec = gpt.spec.model_dump()
    spec["instructions"] += " Mention the shop's name once."
    svc.save_draft(ALICE, gpt.id, spec, gpt.revision, note="Added a rule")
    added = svc.add_knowledge(ALICE, gpt.id, [("prices.md", PRICES), ("hours.txt", HOURS)], run_jobs=False)
    if ingest:
        svc.jobs.run_until_idle()
        assert [f.status for f in svc.list_knowledge(ALICE, gpt.id)] == ["ready", "ready"]
    svc.create_share_link(ALICE, gpt.id, label="Everyone", public=True, quota=500)
    svc.create_share_link(ALICE, gpt.id, label="Staff", domains=["harbourbooks.example"])
    gone, _ = svc.create_share_link(ALICE, gpt.id, label="Old")
    svc.revoke_share_link(ALICE, gone.id)
    svc.save_embed_settings(ALICE, gpt.id, sites="https://harbourbooks.example", policy="public",
                            theme={"title": "Ask Harbour Books"})
    with svc.store.tx() as conn:
        bstore.insert_correction(conn, gpt.id, question="Do you open on Mondays?", answer="No, we are closed.",
                                 target="knowledge", knowledge_file_id=added.files[1].file_id)
    if callable(getattr(svc, "save_privacy_settings", None)):
        svc.save_privacy_settings(ALICE, gpt.id, retention_days=30, record=True, redact=True)
    else:
        with svc.store.tx() as conn:
            bstore.save_privacy(conn, gpt.id, retention_days=30, record=True, redact=True)
    examples = [Example.single(f"Tell me about {t}.", f"Ahoy! About {t}: ask at the desk.")
                for t in ("vouchers", "delivery", "hours", "maps", "poetry", "clubs", "parking", "events")]
    svc.start_finetune(ALICE, gpt.id, examples, {"epochs": 1, "rank": 4, "max_length": 64, "eval_share": 0.25},
                       start_worker=False)
    return gpt.id


def ask(svc: Services, gpt_id: str, text: str = QUESTION) -> str:
    conv = svc.start_conversation(ALICE, gpt_id)
    return "".join(svc.send(ALICE, conv, text).pieces)


def settings_view(svc: Services, gpt_id: str) -> dict:
    embed = svc.embed_settings(ALICE, gpt_id)
    with svc.store.read() as conn:
        privacy = bstore.get_privacy(conn, gpt_id)
    links = sorted((link.label, link.policy, tuple(link.allowed_domains), link.message_quota, link.status)
                   for link in svc.list_share_links(ALICE, gpt_id))
    return {"sites": embed.sites, "policy": embed.policy, "theme": embed.theme, "limits": embed.limits.to_json(),
            "privacy": privacy, "links": links}


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    monkeypatch.setenv("PGPT_FINETUNE_LOCAL_WORKER", "0")  # nothing trains here


# --- the round trip with the real model ----------------------------------------------------

@pytest.mark.slow
def test_round_trip_into_another_home_keeps_behaviour_and_never_overwrites(home, tmp_path, monkeypatch):
    a = services()
    try:
        gpt_id = build_gpt(a)
        number = publish_adapter(a, gpt_id, make_lora(a.settings, tmp_path / "lora"))
        assert a.active_adapter(ALICE, gpt_id).number == number
        before_spec = a.get_gpt(ALICE, gpt_id).spec
        before_versions = [(v.number, v.note, v.spec) for v in a.versions(ALICE, gpt_id)]
        before_top = a.search_knowledge(ALICE, gpt_id, QUESTION, k=1)[0].text
        before_answer = ask(a, gpt_id)
        before_settings = settings_view(a, gpt_id)
        a.activate_adapter(ALICE, gpt_id, None)
        assert ask(a, gpt_id) != before_answer  # the adapter really changes the answer
        a.activate_adapter(ALICE, gpt_id, number)

        bundle = a.export_gpt(ALICE, gpt_id, tmp_path / "out" / "harbour.zip")
        with zipfile.ZipFile(bundle) as zf:
            names = zf.namelist()
            manifest = json.loads(zf.read(MANIFEST))
            settings_json = zf.read("settings.json").decode()
        assert names[0] == MANIFEST
        assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
        assert sorted(m["name"] for m in manifest["members"]) == sorted(names[1:])
        assert any(n.startswith("knowledge/") for n in names) and any(n.startswith("adapters/") for n in names)
        assert any(n.startswith("finetune/") and n.endswith("dataset.jsonl") for n in names)
        assert not any("conversation" in n for n in names)
        assert "token" not in settings_json and "hash" not in settings_json

        other_home(tmp_path, monkeypatch)
        b = services(models=a.models)  # the same loaded model; another home and database
        try:
            result = b.import_gpt(ALICE, bundle, run_jobs=False)
            b.jobs.run_until_idle()
            assert result.gpt_id != gpt_id and result.name == "Harbour Books"
            imported = b.get_gpt(ALICE, result.gpt_id)
            assert imported.spec == before_spec
            assert [(v.number, v.note, v.spec) for v in b.versions(ALICE, result.gpt_id)] == before_versions
            assert imported.published_version == 1
            assert [f.status for f in b.list_knowledge(ALICE, result.gpt_id)] == ["ready", "ready"]
            assert b.search_knowledge(ALICE, result.gpt_id, QUESTION, k=1)[0].text == before_top
            assert result.adapters == [1] and result.active_adapter == 1
            assert b.active_adapter(ALICE, result.gpt_id).metrics == {"eval_loss_before": 2.5, "eval_loss_after": 1.9}
            # published version 1 and the adapter: the same greedy answer as before the export
            assert ask(b, result.gpt_id) == before_answer
            after_settings = settings_view(b, result.gpt_id)
            assert after_settings["links"] == [l for l in before_settings["links"] if l[-1] != "revoked"]
            assert {k: v for k, v in after_settings.items() if k != "links"} == \
                {k: v for k, v in before_settings.items() if k != "links"}
            assert len(result.share_links) == 2 and any("revoked" in s for s in result.skipped)
            assert b.open_share_token(result.share_links[0].token) == result.share_links[0].id  # new links work
            with b.store.read() as conn:
                corrections = bstore.list_corrections(conn, result.gpt_id)
            assert [(c["question"], c["target"]) for c in corrections] == [("Do you open on Mondays?", "knowledge")]
            hours = [f for f in b.list_knowledge(ALICE, result.gpt_id) if f.display_name == "hours.txt"][0]
            assert corrections[0]["knowledge_file_id"] == hours.id
            assert result.finetune_datasets == 1
            assert list((b.settings.home / "gpts" / result.gpt_id / "finetune").glob("*/dataset.jsonl"))

            again = b.import_gpt(ALICE, bundle, run_jobs=False)  # twice: two GPTs, the first untouched
            b.jobs.run_until_idle()
            assert again.gpt_id != result.gpt_id and again.name == "Harbour Books (imported)"
            assert sorted(g.name for g in b.list_gpts(ALICE)) == ["Harbour Books", "Harbour Books (imported)"]
            assert b.get_gpt(ALICE, result.gpt_id).spec == before_spec
        finally:
            b.__dict__.pop("models", None)  # a closes the shared registry
            b.close()
    finally:
        a.close()


# --- imports that fail or skip (no real model needed) ---------------------------------------

@pytest.fixture
def svc(home):
    s = services(models=FakeRegistry())
    yield s
    s.close()


def test_a_failure_midway_leaves_nothing_behind(svc, tmp_path, monkeypatch):
    gpt_id = build_gpt(svc, ingest=False)  # the originals are exported whether or not they were indexed
    publish_adapter(svc, gpt_id, fake_peft_folder(tmp_path / "peft", BUNDLED))
    bundle = svc.export_gpt(ALICE, gpt_id, tmp_path / "harbour.zip")
    other_home(tmp_path, monkeypatch)
    b = services(models=FakeRegistry())
    try:
        b.list_gpts(ALICE)  # the creator's user row exists before the snapshot
        before = snapshot(b)

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(b, "create_share_link", disk_full)  # the very last step fails
        with pytest.raises(InvalidInput, match="No space left on device.*nothing of it was kept"):
            b.import_gpt(ALICE, bundle, run_jobs=False)
        assert snapshot(b) == before
        assert b.list_gpts(ALICE) == []
    finally:
        b.close()


def test_an_adapter_for_a_model_this_home_cannot_load_is_skipped_with_a_sentence(svc, tmp_path, monkeypatch):
    gpt_id = build_gpt(svc, ingest=False)
    missing = "hf:/nowhere/a-model-folder"
    publish_adapter(svc, gpt_id, fake_peft_folder(tmp_path / "one", missing), base=missing, active=False)
    publish_adapter(svc, gpt_id, fake_peft_folder(tmp_path / "two", BUNDLED), active=True)
    bundle = svc.export_gpt(ALICE, gpt_id, tmp_path / "harbour.zip")
    other_home(tmp_path, monkeypatch)
    b = services(models=FakeRegistry())
    try:
        result = b.import_gpt(ALICE, bundle, run_jobs=False)
        assert any("Adapter version 1 was not imported" in s and "/nowhere/a-model-folder" in s for s in result.skipped)
        assert result.adapters == [1] and result.active_adapter == 1
        assert [a.base_model for a in b.list_adapters(ALICE, result.gpt_id)] == [BUNDLED]
        assert any("numbered again" in n for n in result.notes)
        assert b.get_gpt(ALICE, result.gpt_id).spec == svc.get_gpt(ALICE, gpt_id).spec  # the rest came in
    finally:
        b.close()


def test_export_of_someone_elses_gpt_is_not_found(svc, tmp_path):
    from personal_gpt.errors import NotFound

    gpt = svc.create_gpt(ALICE, name="Mine")
    bob = Principal(issuer="https://idp.example", subject="bob")
    with pytest.raises(NotFound):
        svc.export_gpt(bob, gpt.id, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


# --- save as template ---------------------------------------------------------------------

@pytest.fixture
def templates_dir(tmp_path, monkeypatch) -> Path:
    import shutil

    folder = tmp_path / "templates"
    shutil.copytree(Path(__file__).resolve().parents[2] / "templates", folder)
    monkeypatch.setenv("PERSONAL_GPT_TEMPLATES_DIR", str(folder))
    return folder


def test_save_as_template_loads_and_renders_back(templates_dir, home):
    svc = services(models=FakeRegistry())
    try:
        gpt = svc.create_gpt(ALICE, spec={
            "name": "Harbour Books", "description": "Answers questions about Harbour Books.", "avatar": "📚",
            "instructions": "You answer questions about Harbour Books.\n\nRules:\n- Keep answers short.",
            "starters": ["What are your opening hours?"],
            "generation": {"temperature": 0.3, "max_new_tokens": 200},
        })
        assert "harbour-helper" not in {t.id for t in svc.templates()}
        path = svc.save_as_template(ALICE, gpt.id, key="harbour-helper", title="Bookshop helper")
        assert path == templates_dir / "harbour-helper.yaml"
        catalog = load_templates(templates_dir)
        assert not catalog.problems
        template = catalog.get("harbour-helper")
        spec = render(template, {})
        assert (spec.instructions, spec.starters, spec.generation, spec.description, spec.avatar) == \
            (gpt.spec.instructions, gpt.spec.starters, gpt.spec.generation, gpt.spec.description, gpt.spec.avatar)
        assert len(template.test_questions) >= 3
        assert "harbour-helper" in {t.id for t in svc.templates()}  # the catalog refreshed
        made = svc.create_gpt(ALICE, template_id="harbour-helper", name="From my template")
        assert made.spec.instructions == gpt.spec.instructions
        with pytest.raises(Conflict):
            svc.save_as_template(ALICE, gpt.id, key="harbour-helper")
        with pytest.raises(Conflict):
            svc.save_as_template(ALICE, gpt.id, key="faq-bot")  # an existing template's key
    finally:
        svc.close()


def test_a_gpt_made_from_a_template_keeps_its_blanks(templates_dir, home):
    svc = services(models=FakeRegistry())
    try:
        source = svc.catalog.get("faq-bot")
        values = source.example_blanks()
        gpt = svc.create_gpt(ALICE, template_id="faq-bot", blanks=values, name="Garden FAQ")
        svc.save_as_template(ALICE, gpt.id, key="garden-faq")
        template = load_templates(templates_dir).get("garden-faq")
        assert [b.key for b in template.blanks] == [b.key for b in source.blanks]
        assert template.instructions == source.instructions  # blanks kept as {key}
        spec = render(template, {})  # the GPT's values are the defaults
        assert spec.instructions == gpt.spec.instructions and spec.starters == gpt.spec.starters
        again = render(template, {"business_name": "Hilltop Allotments"})
        assert "Hilltop Allotments" in again.instructions
    finally:
        svc.close()


def test_save_as_template_refuses_what_templates_cannot_hold(templates_dir, home):
    svc = services(models=FakeRegistry())
    try:
        gpt = svc.create_gpt(ALICE, spec={"name": "Braces", "description": "x",
                                          "instructions": "Answer in JSON like {\"a\": 1}."})
        with pytest.raises(InvalidInput, match="braces"):
            svc.save_as_template(ALICE, gpt.id, key="braces")
        with pytest.raises(InvalidInput, match="key"):
            svc.save_as_template(ALICE, gpt.id, key="../evil")
        assert not (templates_dir / "braces.yaml").exists()
        assert not list(templates_dir.parent.glob("evil*"))
    finally:
        svc.close()


# --- the CLI, end to end --------------------------------------------------------------------

def test_cli_export_and_import_with_json(home, tmp_path, monkeypatch):
    from personal_gpt.cli import main

    svc = services(models=FakeRegistry())
    try:
        gpt = svc.create_gpt(Principal.local(), spec={"name": "Shop", "instructions": "Be brief."})
        svc.add_knowledge(Principal.local(), gpt.id, [("hours.txt", HOURS)], run_jobs=False)
        svc.jobs.run_until_idle()
        svc.create_share_link(Principal.local(), gpt.id, label="All", public=True)
    finally:
        svc.close()
    runner = CliRunner()
    out = tmp_path / "shop.zip"
    done = runner.invoke(main, ["export", gpt.id, "-o", str(out), "--json"])
    assert done.exit_code == 0, done.output
    exported = json.loads(done.stdout)
    assert exported["file"] == str(out) and exported["size_bytes"] == out.stat().st_size > 0

    other_home(tmp_path, monkeypatch)
    done = runner.invoke(main, ["import", str(out), "--json", "--base-url", "https://gpts.example"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["name"] == "Shop" and data["gpt_id"] != gpt.id
    assert data["knowledge"] == [{"name": "hours.txt", "status": "queued", "message": ""}]
    assert data["share_links"][0]["url"].startswith("https://gpts.example/s/")
    listed = runner.invoke(main, ["list", "--json"])
    assert [g["id"] for g in json.loads(listed.stdout)] == [data["gpt_id"]]
    searched = runner.invoke(main, ["search", data["gpt_id"], "closed on Mondays", "--json"])
    assert searched.exit_code == 0 and "Mondays" in searched.stdout  # re-indexed in the new home

    bad = tmp_path / "not-a-bundle.zip"
    bad.write_bytes(b"hello, I am text")
    done = runner.invoke(main, ["import", str(bad)])
    assert done.exit_code == 2
    assert "not a .zip file" in done.stderr and "Traceback" not in done.output
    done = runner.invoke(main, ["export", "gpt_000000000000", "-o", str(tmp_path / "none.zip")])
    assert done.exit_code == 2 and "There is no GPT" in done.stderr


def test_cli_templates_save_and_list(templates_dir, home):
    from personal_gpt.cli import main

    svc = services(models=FakeRegistry())
    try:
        gpt = svc.create_gpt(Principal.local(), spec={"name": "Shop", "description": "Helps shop visitors.",
                                                      "instructions": "Be brief."})
    finally:
        svc.close()
    runner = CliRunner()
    done = runner.invoke(main, ["templates", "save", gpt.id, "--key", "shop-helper", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["file"] == str(templates_dir / "shop-helper.yaml")
    listed = json.loads(runner.invoke(main, ["templates", "--json"]).stdout)
    assert "shop-helper" in [t["id"] for t in listed]
    done = runner.invoke(main, ["templates", "save", gpt.id, "--key", "shop-helper"])
    assert done.exit_code == 2 and "already a template called 'shop-helper'" in done.stderr


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    from personal_gpt.bundle import Member, write_bundle

    dest = tmp_path / "out" / "gpt.zip"
    write_bundle(dest, [Member("gpt.json", data=b"{}")], app_version="test", gpt_name="Old")
    old = dest.read_bytes()

    class Broken(Member):
        calls = 0

        def chunks(self):  # hashed fine, then the disk fails while the zip is being written
            Broken.calls += 1
            yield b"half of it"
            if Broken.calls > 1:
                raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):
        write_bundle(dest, [Member("gpt.json", data=b"{}"), Broken("knowledge/1-x.txt", data=b"x")],
                     app_version="test", gpt_name="New")
    assert Broken.calls == 2
    assert dest.read_bytes() == old
    assert [p.name for p in dest.parent.iterdir()] == ["gpt.zip"]
