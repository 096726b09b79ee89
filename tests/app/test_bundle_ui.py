"""The export section (builder) and the import section (My GPTs) through AppTest, on the
real database with the echo stand-in at the ChatModel seam: prepare and download a bundle,
save as template, upload a bundle and see what was imported and the new share link, and a
bad upload answered with one sentence."""

from __future__ import annotations

import shutil
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from personal_gpt.auth import Principal
from personal_gpt.services import Services
from personal_gpt.web import glue
from tests.support.fake_model import FakeRegistry

ME = Principal.local()


def export_section():
    import streamlit as st

    from personal_gpt.auth import Principal
    from personal_gpt.web import glue
    from personal_gpt.web.bundle_ui import render_export

    render_export(glue.services(), Principal.local(), st.session_state["gpt_id"])


def import_section():
    from personal_gpt.auth import Principal
    from personal_gpt.web import glue
    from personal_gpt.web.bundle_ui import render_import

    render_import(glue.services(), Principal.local())


@pytest.fixture
def svc(home, tmp_path, monkeypatch):
    folder = tmp_path / "templates"
    shutil.copytree(Path(__file__).resolve().parents[2] / "templates", folder)
    monkeypatch.setenv("PERSONAL_GPT_TEMPLATES_DIR", str(folder))
    monkeypatch.setenv("PERSONAL_GPT_BASE_URL", "https://gpts.example.org")
    s = Services(models=FakeRegistry())
    monkeypatch.setattr(glue, "services", lambda: s)
    yield s
    s.close()


@pytest.fixture
def gpt_id(svc):
    g = svc.create_gpt(ME, spec={"name": "Bloom helper", "description": "Helps Bloom's customers.",
                                 "instructions": "Answer questions about Bloom & Branch.", "starters": ["Hi"]})
    svc.publish(ME, g.id)
    svc.add_knowledge(ME, g.id, [("hours.txt", b"Open 9 to 5.")], run_jobs=False)
    svc.create_share_link(ME, g.id, label="Customers", public=True)
    return g.id


def by_label(widgets, label):
    return next(w for w in widgets if w.label == label)


def test_prepare_download_and_save_as_template(svc, gpt_id):
    at = AppTest.from_function(export_section, default_timeout=30)
    at.session_state["gpt_id"] = gpt_id
    at.run()
    assert not at.exception
    by_label(at.button, "Prepare the export file").click().run()
    assert not at.exception and not at.error
    data = at.session_state[f"bundle-export-{gpt_id}"]
    with zipfile.ZipFile(BytesIO(data)) as zf:
        assert zf.namelist()[0] == "manifest.json" and "gpt.json" in zf.namelist()
    assert any(b.label.startswith("Download Bloom-helper.zip") for b in at.get("download_button"))

    by_label(at.text_input, "Template key").input("bloom-helper")
    by_label(at.button, "Save as template").click().run()
    assert not at.exception and not at.error
    assert any("bloom-helper" in s.value for s in at.success)
    assert "bloom-helper" in {t.id for t in svc.templates()}

    by_label(at.text_input, "Template key").input("bloom-helper")  # the same key again
    by_label(at.button, "Save as template").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["There is already a template called 'bloom-helper': pick another key."]


def test_upload_imports_a_new_gpt_and_shows_the_new_link(svc, gpt_id, tmp_path):
    bundle = svc.export_gpt(ME, gpt_id, tmp_path / "bloom.zip").read_bytes()
    at = AppTest.from_function(import_section, default_timeout=30)
    at.run()
    assert not at.exception
    at.file_uploader[0].set_value(("bloom.zip", bundle, "application/zip")).run()
    by_label(at.button, "Import").click().run()
    assert not at.exception and not at.error
    names = sorted(g.name for g in svc.list_gpts(ME))
    assert names == ["Bloom helper", "Bloom helper (imported)"]
    assert any("Bloom helper (imported)" in s.value and "1 knowledge file" in s.value for s in at.success)
    assert any("new addresses" in w.value for w in at.warning)
    new_link = [c.value for c in at.code]
    assert len(new_link) == 1 and new_link[0].startswith("https://gpts.example.org/s/")
    assert any(b.label == "Open the new GPT" for b in at.button)


def test_a_bad_upload_gets_one_sentence(svc, gpt_id):
    at = AppTest.from_function(import_section, default_timeout=30)
    at.run()
    at.file_uploader[0].set_value(("notes.zip", b"not a zip at all", "application/zip")).run()
    by_label(at.button, "Import").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["This file is not a Personal GPTs bundle: it is not a .zip file."]
    assert [g.name for g in svc.list_gpts(ME)] == ["Bloom helper"]
