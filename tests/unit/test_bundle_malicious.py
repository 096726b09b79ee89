"""Bad bundles are refused with one sentence and leave nothing behind: each case below is
made from a real exported bundle, imported through ``Services.import_gpt``, and the home's
files and every table's rows are compared before and after (plus no extraction folder left)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.bundle import (
    BOMB,
    DAMAGED,
    FORMAT_VERSION,
    MANIFEST,
    NO_MANIFEST,
    NOT_A_ZIP,
    OTHER_FORMAT,
    BundleError,
    BundleLimits,
    check_member_name,
    open_bundle,
)
from personal_gpt.config import Settings
from personal_gpt.services import Services
from personal_gpt.store.schema import metadata
from tests.support.fake_model import FakeRegistry

ALICE = Principal(issuer="https://idp.example", subject="alice")


@pytest.fixture
def svc(home):
    s = Services(Settings.from_env(), models=FakeRegistry())
    s.list_gpts(ALICE)  # the creator's row exists before any snapshot
    yield s
    s.close()


@pytest.fixture
def good(svc, tmp_path) -> Path:
    """A real bundle of a GPT with a knowledge file (exported, then the GPT deleted)."""
    gpt = svc.create_gpt(ALICE, spec={"name": "Harbour", "instructions": "Be brief."})
    svc.add_knowledge(ALICE, gpt.id, [("hours.txt", b"Open Tuesday to Sunday, 10am to 6pm.")], run_jobs=False)
    path = svc.export_gpt(ALICE, gpt.id, tmp_path / "good.zip")
    svc.delete_gpt(ALICE, gpt.id)
    return path


def members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def write_zip(path: Path, items: list[tuple[object, bytes]], *, manifest_fix: bool = True,
              manifest_edit=None) -> Path:
    """Write ``items`` (name or ZipInfo, bytes); with ``manifest_fix`` the manifest lists
    exactly the other items with their true sizes and hashes, so only the intended fault is left."""
    items = list(items)
    names = [(i.filename if isinstance(i, zipfile.ZipInfo) else i) for i, _ in items]
    if manifest_fix and MANIFEST in names:
        at = names.index(MANIFEST)
        manifest = json.loads(items[at][1])
        manifest["members"] = [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                               for n, (_, d) in zip(names, items) if n != MANIFEST]
        if manifest_edit:
            manifest_edit(manifest)
        items[at] = (MANIFEST, json.dumps(manifest).encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we write on purpose
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in items:
                zf.writestr(name, data)
    return path


def leftovers() -> list[str]:
    return sorted(p.name for p in Path(tempfile.gettempdir()).glob("pgpt-bundle-*"))


def snapshot(svc: Services):
    files = sorted(str(p.relative_to(svc.settings.home)) for p in svc.settings.home.rglob("*")
                   if not p.name.startswith("personal-gpt.db"))
    with svc.store.read() as conn:
        rows = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in metadata.sorted_tables}
    return files, rows


def refused(svc: Services, path: Path, says: str, limits: BundleLimits | None = None) -> str:
    before, temp_before = snapshot(svc), leftovers()
    with pytest.raises(BundleError) as caught:
        svc.import_gpt(ALICE, path, limits=limits, run_jobs=False)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message and "Traceback" not in message
    assert snapshot(svc) == before  # no GPT row, no file, nothing in any table
    assert leftovers() == temp_before  # the extraction folder is gone too
    assert svc.list_gpts(ALICE) == []
    return message


# --- damaged, wrong kind, newer --------------------------------------------------------------

def test_the_good_bundle_imports(svc, good):
    result = svc.import_gpt(ALICE, good, run_jobs=False)
    assert result.name == "Harbour" and [k["name"] for k in result.knowledge] == ["hours.txt"]


def test_not_a_zip(svc, tmp_path):
    path = tmp_path / "notes.zip"
    path.write_bytes(b"These are my notes, not a bundle.\n" * 10)
    refused(svc, path, NOT_A_ZIP)


def test_an_empty_file(svc, tmp_path):
    path = tmp_path / "empty.zip"
    path.write_bytes(b"")
    refused(svc, path, NOT_A_ZIP)


def test_corrupt_bytes_fail_the_crc(svc, good, tmp_path):
    items = members(good)
    big = b"Open Tuesday to Sunday. " * 2000
    items = [(n, big if n.startswith("knowledge/") else d) for n, d in items]
    path = write_zip(tmp_path / "bad.zip", items)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.startswith("knowledge/"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 5, start + info.compress_size - 5, 7):  # damage the compressed data itself
        raw[i] ^= 0x55
    path.write_bytes(bytes(raw))
    refused(svc, path, DAMAGED)


def test_a_truncated_zip(svc, good, tmp_path):
    data = good.read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(data[: len(data) // 2])
    refused(svc, path, DAMAGED)


def test_a_zip_without_a_manifest(svc, good, tmp_path):
    path = write_zip(tmp_path / "bare.zip", [(n, d) for n, d in members(good) if n != MANIFEST])
    refused(svc, path, NO_MANIFEST)


def test_a_manifest_of_another_format(svc, good, tmp_path):
    path = write_zip(tmp_path / "other.zip", members(good), manifest_edit=lambda m: m.update(format="something-else"))
    refused(svc, path, OTHER_FORMAT)


def test_a_newer_format_version(svc, good, tmp_path):
    path = write_zip(tmp_path / "newer.zip", members(good),
                     manifest_edit=lambda m: m.update(format_version=FORMAT_VERSION + 1))
    message = refused(svc, path, "made by a newer version of Personal GPTs")
    assert "update first" in message


# --- parts that do not match the manifest -----------------------------------------------------

def test_a_missing_member(svc, good, tmp_path):
    items = members(good)
    manifest = json.loads(dict(items)[MANIFEST])
    path = write_zip(tmp_path / "missing.zip", [(MANIFEST, json.dumps(manifest).encode())]
                     + [(n, d) for n, d in items if n not in (MANIFEST, "settings.json")], manifest_fix=False)
    refused(svc, path, "The bundle is incomplete: settings.json is missing.")


def test_an_extra_member(svc, good, tmp_path):
    items = members(good)
    manifest = dict(items)[MANIFEST]
    path = write_zip(tmp_path / "extra.zip", items[1:] + [(MANIFEST, manifest), ("knowledge/9-x.txt", b"hi")],
                     manifest_fix=False)
    refused(svc, path, "a part its manifest does not list (knowledge/9-x.txt)")


def test_a_hash_mismatch(svc, good, tmp_path):
    items = members(good)
    manifest = dict(items)[MANIFEST]
    changed = [(n, d if not n.startswith("knowledge/") else d.replace(b"10am", b"11am")) for n, d in items]
    assert changed != items
    path = write_zip(tmp_path / "hash.zip", [(MANIFEST, manifest)] + changed[1:], manifest_fix=False)
    refused(svc, path, "does not match its manifest (its SHA-256 differs)")


def test_a_header_that_under_declares_the_size(svc, good, tmp_path):
    """Declared (and listed) as 10 bytes, really 4 MB: the bounded read stops at what it measures."""
    items = members(good) + [("finetune/9/dataset.jsonl", b"A" * 10)]
    path = write_zip(tmp_path / "liar.zip", items)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("finetune/9/dataset.jsonl")
    raw = bytearray(path.read_bytes())
    # swap the member's data for a 4 MB deflate stream, keeping every header's size fields at 10
    import zlib

    packed = zlib.compressobj(9, zlib.DEFLATED, -15)
    big = packed.compress(b"A" * (4 * 2**20)) + packed.flush()
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start:start + info.compress_size] = big
    delta = len(big) - info.compress_size
    # move the central directory's offset to its new place
    eocd = raw.rfind(b"PK\x05\x06")
    cd_offset = int.from_bytes(raw[eocd + 16:eocd + 20], "little")
    raw[eocd + 16:eocd + 20] = (cd_offset + delta).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    refused(svc, path, "does not match its manifest (size)")


# --- unsafe names and types -------------------------------------------------------------------

@pytest.mark.parametrize("name, says", [
    ("../evil", "leaves its folder"),
    ("knowledge/../../evil", "leaves its folder"),
    ("/abs", "absolute path"),
    ("C:\\x", "backslash"),
    ("C:/x", "drive letter"),
    ("knowledge\\..\\evil", "backslash"),
])
def test_unsafe_member_names(svc, good, tmp_path, name, says):
    path = write_zip(tmp_path / "names.zip", members(good) + [(name, b"pwned")])
    refused(svc, path, says)
    assert not (tmp_path / "evil").exists() and not Path("/abs").exists()


def test_a_nul_in_a_name(svc, good, tmp_path):
    path = write_zip(tmp_path / "nul.zip", members(good) + [("knowledge/evilX.txt", b"x")])
    raw = path.read_bytes().replace(b"knowledge/evilX.txt", b"knowledge/evil\x00.txt")
    path.write_bytes(raw)
    refused(svc, path, "NUL character")


def test_a_symlink_member(svc, good, tmp_path):
    link = zipfile.ZipInfo("knowledge/9-passwd")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = write_zip(tmp_path / "link.zip", members(good) + [(link, b"/etc/passwd")])
    refused(svc, path, "symbolic link")


def test_duplicate_names(svc, good, tmp_path):
    items = members(good)
    path = write_zip(tmp_path / "dup.zip", items + [("settings.json", dict(items)["settings.json"])])
    refused(svc, path, "two parts called settings.json")


def test_names_that_differ_only_in_case(svc, good, tmp_path):
    path = write_zip(tmp_path / "case.zip", members(good) + [("Settings.json", b"{}")])
    refused(svc, path, "two parts called")


# --- size and count caps -----------------------------------------------------------------------

def test_a_zip_bomb(svc, good, tmp_path):
    """50 MB of zeros compress to ~50 KB: the ratio cap stops the inflate early."""
    bomb = b"\0" * (50 * 2**20)
    path = write_zip(tmp_path / "bomb.zip", members(good) + [("finetune/1/dataset.jsonl", bomb)])
    assert path.stat().st_size < 1 * 2**20
    refused(svc, path, BOMB, limits=BundleLimits(ratio_min_bytes=2**20))


def test_over_the_size_limit(svc, good, tmp_path):
    data = os.urandom(3 * 2**20)
    path = write_zip(tmp_path / "big.zip", members(good) + [("finetune/1/dataset.jsonl", data)])
    refused(svc, path, "unpacks to more than 2.0 MB", limits=BundleLimits(max_total_bytes=2 * 2**20))


def test_too_many_members(svc, good, tmp_path):
    extra = [(f"knowledge/{n}-x.txt", b"x") for n in range(10, 40)]
    path = write_zip(tmp_path / "many.zip", members(good) + extra)
    refused(svc, path, "too many parts", limits=BundleLimits(max_members=20))


# --- the name rules on their own ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt.json", "knowledge/1-prices.md", "adapters/2/adapter_config.json"])
def test_ordinary_names_pass(name):
    assert check_member_name(name) is None


@pytest.mark.parametrize("name", ["", "a//b", "./a", "a/./b", "a/", "..", "d:x", "a\x00b", "x\u202e.txt"])
def test_odd_names_are_refused(name):
    assert check_member_name(name)


def test_open_bundle_extracts_only_into_a_fresh_folder(good, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with open_bundle(good, workdir=work) as opened:
        assert opened.root.parent == work
        assert sorted(p.relative_to(opened.root).as_posix() for p in opened.root.rglob("*") if p.is_file()) \
            == sorted(opened.members)
        assert stat.S_IMODE(opened.path("gpt.json").stat().st_mode) == 0o600
    assert list(work.iterdir()) == []


def test_an_adapter_with_a_pickle_is_skipped_and_never_written(svc, good, tmp_path):
    """SECURITY #38: adapters load only from safetensors. A bundle whose adapter folder
    carries a pickle (``adapter_model.bin``) imports everything else, says the adapter was
    not imported, and writes no pickle anywhere in the home."""
    import pickle

    items = [(n, d) for n, d in members(good) if n != "adapters.json"]
    items += [
        ("adapters/1/adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4}).encode()),
        ("adapters/1/adapter_model.bin", pickle.dumps({"weights": [1, 2, 3]})),
        ("adapters.json", json.dumps([{
            "number": 1, "files": ["adapters/1/adapter_config.json", "adapters/1/adapter_model.bin"],
            "base_model": "bundled:smollm2-135m-instruct", "settings": {}, "data_summary": {}, "metrics": {},
            "samples": [], "is_active": True, "created_at": None,
        }]).encode()),
    ]
    path = write_zip(tmp_path / "pickled.zip", items)
    result = svc.import_gpt(ALICE, path, run_jobs=False)
    assert result.adapters == []
    assert any("Adapter version 1 was not imported" in s for s in result.skipped)
    assert [g.id for g in svc.list_gpts(ALICE)] == [result.gpt_id]
    assert not [p for p in svc.settings.home.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    assert svc.list_adapters(ALICE, result.gpt_id) == []
