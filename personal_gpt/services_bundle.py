"""Services mixin: export and import of a whole GPT as one .zip bundle; save as template (mixed into Services).

Export gathers a GPT's definition, versions, knowledge originals, fine-tuning data, adapters and
settings (never conversations, tokens, key hashes or API keys) into ``bundle.write_bundle``. Import
checks the whole bundle first (``bundle.open_bundle`` and the plan below), then always creates a NEW
GPT through the ordinary Services methods so their validation applies; any failure removes what
the import had made. Must not: trust a bundle's vectors (knowledge is re-ingested) or paths.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from personal_gpt.auth import Principal
from personal_gpt.bundle import BundleError, BundleLimits, Member, OpenedBundle, json_member, open_bundle, safe_part, write_bundle
from personal_gpt.errors import Conflict, InvalidInput, PersonalGptError

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_KNOWLEDGE_BATCH = 50


@dataclass
class NewShareLink:
    """A share link recreated by an import: a NEW address (the old one belongs to the other home)."""

    id: str
    label: str
    public: bool
    token: str  # shown once; clients need the new link


@dataclass
class ImportResult:
    """What an import made. ``skipped`` and ``notes`` are sentences for the creator."""

    gpt_id: str
    name: str
    versions: int
    published_version: int | None
    knowledge: list[dict] = field(default_factory=list)  # {name, status, message}
    ingest_job_id: str | None = None
    adapters: list[int] = field(default_factory=list)
    active_adapter: int | None = None
    finetune_datasets: int = 0
    corrections: int = 0
    share_links: list[NewShareLink] = field(default_factory=list)
    embed: bool = False
    privacy: bool = False
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _iso(value) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _when(value) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def _privacy_dict(value) -> dict | None:
    if value is None:
        return None
    if isinstance(value, dict):
        data = value
    else:
        data = {k: getattr(value, k, None) for k in ("retention_days", "record", "redact")}
    return {"retention_days": data.get("retention_days"), "record": bool(data.get("record", True)),
            "redact": bool(data.get("redact", False))}


def _safetensors_ok(path: Path) -> bool:
    """A safetensors file's header: 8-byte length, then that much JSON object."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return False
            (n,) = struct.unpack("<Q", raw)
            if n <= 1 or n > 100 * 2**20 or n + 8 > path.stat().st_size:
                return False
            return isinstance(json.loads(f.read(n).decode("utf-8")), dict)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _block_text(dumper, value: str):
    style = "|" if "\n" in value else None  # instructions stay readable, as in templates/*.yaml
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _template_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, _block_text)
    return Dumper


def _bad(what: str) -> BundleError:
    return BundleError(f"The bundle's {what} is not valid.")


class BundleMethods:
    # -- export -----------------------------------------------------------------------------

    def export_gpt(self, p: Principal, gpt_id: str, dest: Path) -> Path:
        """Write one of ``p``'s GPTs as a bundle at ``dest`` (replaced atomically). Holds its
        definition and every version, knowledge originals (no vectors), fine-tuning data sets
        and corrections, adapters with their metadata, and share/embed/privacy settings —
        never conversations, share tokens or their hashes, API keys or provider secrets."""
        from personal_gpt import __version__
        from personal_gpt.store import bundles as bstore
        from personal_gpt.store import embeds, repos
        from personal_gpt.store import finetune as fstore
        from personal_gpt.store import knowledge as kstore
        from personal_gpt.store import sharing as links

        uid = self._uid(p)
        with self.store.read() as conn:
            row = self._row(conn, uid, gpt_id)
            versions = sorted(repos.list_versions(conn, gpt_id), key=lambda v: v.number)
            files = kstore.list_files(conn, gpt_id)
            corrections = bstore.list_corrections(conn, gpt_id)
            adapters = fstore.list_adapters(conn, gpt_id)
            jobs = fstore.list_jobs(conn, gpt_id, limit=10_000)
            link_rows = links.list_links(conn, gpt_id)
            embed_row = embeds.get_settings(conn, gpt_id)
            privacy = None if callable(getattr(self, "save_privacy_settings", None)) else bstore.get_privacy(conn, gpt_id)
        if callable(getattr(self, "privacy_settings", None)):
            privacy = _privacy_dict(self.privacy_settings(p, gpt_id))

        members: list[Member] = []
        members.append(json_member("gpt.json", {
            "draft": row.draft, "published_version": row.published_version,
            "versions": [{"number": v.number, "note": v.note, "spec": v.spec, "created_at": _iso(v.created_at)}
                         for v in versions],
        }))

        knowledge, member_of_file = [], {}
        for n, f in enumerate(files, 1):
            blob = self.blobs.path(gpt_id, f.content_hash)
            if not blob.is_file() or blob.is_symlink():
                continue
            name = f"knowledge/{n}-{safe_part(f.display_name)}"
            members.append(Member(name, source=blob))
            member_of_file[f.id] = name
            knowledge.append({"member": name, "name": f.display_name, "filetype": f.filetype, "status": f.status,
                              "sha256": f.content_hash})
        members.append(json_member("knowledge.json", knowledge))

        datasets = []
        for n, job in enumerate(sorted(jobs, key=lambda j: j.created_at), 1):
            folder = job.payload.get("dir")
            source = self._home_path(folder) / "dataset.jsonl" if isinstance(folder, str) else None
            if source is None or not source.is_file() or source.is_symlink() \
                    or not source.resolve().is_relative_to(self._gpt_dir(gpt_id).resolve()):
                continue
            name = f"finetune/{n}/dataset.jsonl"
            members.append(Member(name, source=source))
            datasets.append({"member": name, "job_id": job.id, "status": job.status,
                             "created_at": _iso(job.created_at)})
        members.append(json_member("finetune.json", datasets))
        members.append(json_member("corrections.json", [
            {"question": c["question"], "answer": c["answer"], "target": c["target"],
             "knowledge_member": member_of_file.get(c["knowledge_file_id"]), "created_at": _iso(c["created_at"])}
            for c in corrections
        ]))

        adapter_items = []
        for a in adapters:
            folder = self._home_path(a.path)
            paths = [folder / f for f in ADAPTER_FILES]
            if not all(x.is_file() and not x.is_symlink() for x in paths):
                continue  # an incomplete folder cannot be used anywhere
            names = []
            for x in paths:
                names.append(f"adapters/{a.number}/{x.name}")
                members.append(Member(names[-1], source=x))
            adapter_items.append({
                "number": a.number, "files": names, "base_model": a.base_model, "settings": a.settings,
                "data_summary": a.data_summary, "metrics": a.metrics, "samples": a.samples,
                "is_active": a.is_active, "created_at": _iso(a.created_at),
            })
        members.append(json_member("adapters.json", adapter_items))

        members.append(json_member("settings.json", {
            "share_links": [
                {"label": r.label, "policy": r.policy, "allowed_emails": list(r.allowed_emails),
                 "allowed_domains": list(r.allowed_domains), "expires_at": _iso(r.expires_at),
                 "message_quota": r.message_quota, "revoked": r.revoked_at is not None}
                for r in sorted(link_rows, key=lambda r: r.created_at)
            ],
            "embed": None if embed_row is None else {
                "sites": list(embed_row.allowed_sites), "policy": embed_row.policy,
                "allowed_emails": list(embed_row.allowed_emails), "allowed_domains": list(embed_row.allowed_domains),
                "theme": dict(embed_row.theme), "limits": dict(embed_row.limits),
            },
            "privacy": privacy,
            "api_keys": "not exported (secrets): create new keys after import",
        }))
        dest = Path(dest).expanduser()
        try:
            out = write_bundle(dest, members, app_version=__version__, gpt_name=row.draft.get("name", ""))
        except OSError as exc:
            raise InvalidInput(f"The bundle could not be written to {dest} ({exc.strerror or 'disk error'}).") from None
        log.info("GPT %s exported to %s (%d parts)", gpt_id, out, len(members) + 1)
        return out

    # -- import: the plan (every check, no writes) ---------------------------------------------

    def _import_plan(self, p: Principal, b: OpenedBundle) -> dict:
        from personal_gpt.services import make_spec

        gpt = b.json("gpt.json")
        if not isinstance(gpt, dict) or not isinstance(gpt.get("versions"), list) or not gpt["versions"]:
            raise _bad("gpt.json")
        versions = []
        for v in gpt["versions"]:
            if not isinstance(v, dict) or not isinstance(v.get("number"), int) or not isinstance(v.get("spec"), dict):
                raise _bad("gpt.json")
            try:
                spec = make_spec(v["spec"])
            except InvalidInput as exc:
                raise BundleError(f"Version {v['number']} in the bundle is not valid: {exc}") from None
            versions.append({"number": v["number"], "note": str(v.get("note") or "Imported")[:200], "spec": spec})
        numbers = [v["number"] for v in versions]
        if numbers != sorted(set(numbers)):
            raise _bad("gpt.json (version numbers)")
        try:
            draft = make_spec(gpt.get("draft") if isinstance(gpt.get("draft"), dict) else versions[-1]["spec"])
        except InvalidInput as exc:
            raise BundleError(f"The bundle's draft is not valid: {exc}") from None
        published = gpt.get("published_version")
        if published is not None and published not in numbers:
            raise _bad("gpt.json (published version)")

        knowledge = b.json("knowledge.json", [])
        if not isinstance(knowledge, list) or not all(
                isinstance(k, dict) and isinstance(k.get("member"), str) and b.has(k["member"])
                and k["member"].startswith("knowledge/") and isinstance(k.get("name"), str) for k in knowledge):
            raise _bad("knowledge.json")
        datasets = b.json("finetune.json", [])
        if not isinstance(datasets, list) or not all(
                isinstance(d, dict) and isinstance(d.get("member"), str) and b.has(d["member"])
                and d["member"].startswith("finetune/") for d in datasets):
            raise _bad("finetune.json")
        corrections = b.json("corrections.json", [])
        if not isinstance(corrections, list) or not all(
                isinstance(c, dict) and isinstance(c.get("question"), str) and isinstance(c.get("answer"), str)
                and c.get("target") in ("knowledge", "finetune") for c in corrections):
            raise _bad("corrections.json")
        adapters = b.json("adapters.json", [])
        if not isinstance(adapters, list) or not all(
                isinstance(a, dict) and isinstance(a.get("number"), int) and isinstance(a.get("base_model"), str)
                and isinstance(a.get("files"), list) and all(isinstance(f, str) and b.has(f)
                                                             and f.startswith("adapters/") for f in a["files"])
                for a in adapters):
            raise _bad("adapters.json")
        settings = b.json("settings.json", {}) or {}
        if not isinstance(settings, dict):
            raise _bad("settings.json")
        links = settings.get("share_links") or []
        if not isinstance(links, list) or not all(isinstance(x, dict) for x in links):
            raise _bad("settings.json (share links)")
        embed = settings.get("embed")
        if embed is not None:
            embed = self._check_embed(embed)
        privacy = settings.get("privacy")
        if privacy is not None:
            privacy = self._check_privacy(privacy)
        return {"versions": versions, "draft": draft, "published": published, "knowledge": knowledge,
                "datasets": datasets, "corrections": corrections, "adapters": adapters, "links": links,
                "embed": embed, "privacy": privacy}

    @staticmethod
    def _check_embed(embed) -> dict:
        from personal_gpt.embed_sites import normalise_sites, normalise_theme
        from personal_gpt.limits import check_limits_input
        from personal_gpt.sharing import POLICIES, normalise_domains, normalise_emails

        if not isinstance(embed, dict) or embed.get("policy") not in POLICIES:
            raise _bad("settings.json (embed)")
        try:  # the same checks save_embed_settings makes, before anything is created
            out = {"sites": list(normalise_sites(embed.get("sites") or [])), "policy": embed["policy"],
                   "emails": list(normalise_emails(embed.get("allowed_emails") or [])),
                   "domains": list(normalise_domains(embed.get("allowed_domains") or [])),
                   "theme": normalise_theme(embed.get("theme") or {}),
                   "limits": check_limits_input(embed.get("limits") or {}).to_json()}
        except InvalidInput as exc:
            raise BundleError(f"The bundle's embed settings are not valid: {exc}") from None
        return out

    @staticmethod
    def _check_privacy(privacy) -> dict:
        if not isinstance(privacy, dict):
            raise _bad("settings.json (privacy)")
        days = privacy.get("retention_days")
        if days is not None and (isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36_500):
            raise _bad("settings.json (retention days)")
        try:
            from personal_gpt.services_privacy import check_retention
        except ImportError:  # privacy controls not in this version: the table's own rules apply
            check_retention = None
        if check_retention is not None:
            try:
                days = check_retention(days)
            except InvalidInput as exc:
                raise BundleError(f"The bundle's privacy settings are not valid: {exc}") from None
        if not isinstance(privacy.get("record", True), bool) or not isinstance(privacy.get("redact", False), bool):
            raise _bad("settings.json (privacy)")
        return {"retention_days": days, "record": privacy.get("record", True), "redact": privacy.get("redact", False)}

    def _import_name(self, p: Principal, name: str) -> tuple[str, set[str]]:
        taken = {g.name.casefold() for g in self.list_gpts(p)}
        if name.casefold() not in taken:
            return name, taken
        candidate, n = f"{name} (imported)"[:80], 2
        while candidate.casefold() in taken:
            candidate = f"{name} (imported {n})"[:80]
            n += 1
        return candidate, taken

    # -- import: doing it ---------------------------------------------------------------------

    def import_gpt(self, p: Principal, path: Path, *, limits: BundleLimits | None = None,
                   run_jobs: bool = True) -> ImportResult:
        """Create a NEW GPT of ``p``'s from a bundle file (never overwrites one). The bundle is
        checked completely first (BundleError with one sentence, nothing written); then the
        GPT, its versions, knowledge (re-ingested: an ingest job is queued, and run in the
        background unless ``run_jobs`` is False), corrections, fine-tuning data, adapters,
        embed and privacy settings and share links (with NEW addresses) are made through the
        usual methods. If any step fails, everything the import made is removed again."""
        self._uid(p)
        with open_bundle(Path(path), limits or BundleLimits.from_env()) as b:
            plan = self._import_plan(p, b)
            name, taken = self._import_name(p, plan["draft"].name)
            state: dict = {"gpt_id": None, "root_existed": (self.settings.home / "gpts").exists()}
            try:
                result = self._apply_import(p, b, plan, name, taken, state)
            except BaseException as exc:
                if state["gpt_id"]:
                    self._undo_import(p, state["gpt_id"])
                if not state["root_existed"]:  # the first GPT folder of this home: leave no empty parent
                    try:
                        (self.settings.home / "gpts").rmdir()
                    except OSError:
                        pass
                if isinstance(exc, OSError):
                    raise InvalidInput("The import stopped because a file could not be written "
                                       f"({exc.strerror or 'disk error'}); nothing of it was kept.") from None
                raise
        if run_jobs and result.ingest_job_id:
            self.jobs.wake()
        log.info("bundle %s imported as %s", Path(path).name, result.gpt_id)
        return result

    def _undo_import(self, p: Principal, gpt_id: str) -> None:
        try:
            self.delete_gpt(p, gpt_id)
        except PersonalGptError:
            pass
        except Exception:  # noqa: BLE001 - the original failure is what the creator needs to hear
            log.exception("could not remove the half-imported GPT %s", gpt_id)
        shutil.rmtree(self._gpt_dir(gpt_id), ignore_errors=True)
        if "retriever" in self.__dict__:
            self.retriever.forget(gpt_id)

    def _apply_import(self, p, b: OpenedBundle, plan: dict, name: str, taken: set[str], state: dict) -> ImportResult:
        from personal_gpt.store import bundles as bstore

        result = ImportResult(gpt_id="", name=name, versions=0, published_version=None)
        old_name = plan["draft"].name.casefold()

        def renamed(spec):
            if spec.name.casefold() == old_name or spec.name.casefold() in taken:
                return spec.model_copy(update={"name": name})
            return spec

        specs = [renamed(v["spec"]) for v in plan["versions"]]
        gpt = self.create_gpt(p, spec=specs[0])
        state["gpt_id"] = gid = result.gpt_id = gpt.id
        number_of = {plan["versions"][0]["number"]: gpt.latest_version}
        with self.store.tx() as conn:
            bstore.set_version_note(conn, gid, gpt.latest_version, plan["versions"][0]["note"])
        for v, spec in zip(plan["versions"][1:], specs[1:]):
            gpt = self.save_draft(p, gid, spec, gpt.revision, note=v["note"])
            number_of[v["number"]] = gpt.latest_version
        draft = renamed(plan["draft"])
        if draft.model_dump(mode="json") != gpt.spec.model_dump(mode="json"):
            gpt = self.save_draft(p, gid, draft, gpt.revision, note="Imported draft")
        result.versions = len(self.versions(p, gid))
        if plan["published"] is not None:
            gpt = self.publish(p, gid, number_of[plan["published"]])
            result.published_version = gpt.published_version
        if len(set(number_of.values())) != len(number_of):
            result.notes.append("Some versions were identical and were kept as one, so version numbers differ.")
        self._note_model(p, gpt.spec, result)

        file_id_of = self._import_knowledge(p, gid, b, plan["knowledge"], result)
        for c in plan["corrections"]:
            with self.store.tx() as conn:
                bstore.insert_correction(conn, gid, question=c["question"], answer=c["answer"], target=c["target"],
                                         knowledge_file_id=file_id_of.get(c.get("knowledge_member")),
                                         created_at=_when(c.get("created_at")))
            result.corrections += 1
        for n, d in enumerate(plan["datasets"], 1):
            target = self._gpt_dir(gid) / "finetune" / f"imported-{n}" / "dataset.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(b.path(d["member"]), target)
            result.finetune_datasets += 1
        self._import_adapters(p, gid, gpt.spec, b, plan["adapters"], result)
        if plan["embed"] is not None:
            e = plan["embed"]
            self.save_embed_settings(p, gid, sites=e["sites"], policy=e["policy"], emails=e["emails"],
                                     domains=e["domains"], theme=e["theme"], limits=e["limits"])
            result.embed = True
        if plan["privacy"] is not None:
            pr = plan["privacy"]
            if callable(getattr(self, "save_privacy_settings", None)):
                self.save_privacy_settings(p, gid, retention_days=pr["retention_days"], record=pr["record"],
                                           redact=pr["redact"])
            else:
                with self.store.tx() as conn:
                    bstore.save_privacy(conn, gid, **pr)
            result.privacy = True
        self._import_links(p, gid, plan["links"], result)
        return result

    def _note_model(self, p: Principal, spec, result: ImportResult) -> None:
        from personal_gpt.store import repos

        ref = spec.model or ""
        if ref.startswith("openai:"):
            with self.store.read() as conn:
                known = repos.get_provider(conn, self._uid(p), ref.split(":", 1)[1]) is not None
            if not known:
                result.notes.append("This GPT used a model server that this app does not have: pick its model in "
                                    "the builder before chatting.")
        elif ref.startswith("hf:") and not (Path(ref[3:]) / "config.json").is_file():
            result.notes.append(f"This GPT used a local model folder ({ref[3:]}) that this computer does not have: "
                                "pick its model in the builder before chatting.")

    def _import_knowledge(self, p, gid: str, b: OpenedBundle, items: list[dict], result: ImportResult) -> dict:
        file_id_of: dict[str, str] = {}
        for start in range(0, len(items), MAX_KNOWLEDGE_BATCH):
            batch = items[start:start + MAX_KNOWLEDGE_BATCH]
            files = [(k["name"], b.path(k["member"]).read_bytes()) for k in batch]
            added = self.add_knowledge(p, gid, files, run_jobs=False)
            result.ingest_job_id = added.job_id or result.ingest_job_id
            for k, f in zip(batch, added.files):
                result.knowledge.append({"name": f.name, "status": f.status, "message": f.message})
                if f.file_id:
                    file_id_of[k["member"]] = f.file_id
                if f.status == "rejected":
                    result.skipped.append(f"Knowledge file {f.name} was not added: {f.message}")
        return file_id_of

    def _adapter_base_problem(self, base: str) -> str | None:
        from personal_gpt.models.registry import parse_ref

        try:
            _, kind, target = parse_ref(base, self.settings.default_model)
        except InvalidInput:
            return "it was trained for a model this app does not know"
        if kind == "openai":
            return "it was trained for a model server, not a model on this computer"
        if kind == "hf" and not (Path(target) / "config.json").is_file():
            return f"it was trained for a local model folder ({target}) that this computer does not have"
        return None

    def _import_adapters(self, p, gid: str, spec, b: OpenedBundle, items: list[dict], result: ImportResult) -> None:
        from personal_gpt.models.registry import parse_ref
        from personal_gpt.store import finetune as fstore

        try:
            current, _, _ = parse_ref(self.model_ref(spec), self.settings.default_model)
        except InvalidInput:
            current = None
        renumbered = False
        for a in sorted(items, key=lambda a: a["number"]):
            problem = self._adapter_base_problem(a["base_model"])
            files = {Path(f).name: b.path(f) for f in a["files"]}
            if problem is None and (set(files) != set(ADAPTER_FILES)
                                    or not _safetensors_ok(files["adapter_model.safetensors"])):
                problem = "its files are incomplete or damaged"
            if problem is None:
                try:
                    if not isinstance(json.loads(files["adapter_config.json"].read_text(encoding="utf-8")), dict):
                        problem = "its settings file is damaged"
                except (ValueError, UnicodeDecodeError):
                    problem = "its settings file is damaged"
            if problem is not None:
                result.skipped.append(f"Adapter version {a['number']} was not imported: {problem}.")
                renumbered = True
                continue
            adapter_id = fstore.new_adapter_id()
            root = self._gpt_dir(gid) / "adapters"
            root.mkdir(parents=True, exist_ok=True)
            tmp, final = root / f".tmp-{adapter_id}", root / adapter_id
            tmp.mkdir()
            for fname, source in files.items():
                shutil.copyfile(source, tmp / fname)
            os.rename(tmp, final)  # the folder appears complete or not at all
            with self.store.tx() as conn:
                number = fstore.insert_adapter(
                    conn, gid, adapter_id=adapter_id, job_id=None, base_model=a["base_model"],
                    path=final.relative_to(self.settings.home).as_posix(),
                    settings=dict(a.get("settings") or {}), data_summary=dict(a.get("data_summary") or {}),
                    metrics=dict(a.get("metrics") or {}), samples=list(a.get("samples") or []),
                )
                if a.get("is_active"):
                    if a["base_model"] == current:
                        fstore.set_active(conn, gid, number)
                        result.active_adapter = number
                    else:
                        result.notes.append(f"Adapter version {number} was active but is for another model than "
                                            "this GPT uses now, so it stays off.")
            result.adapters.append(number)
        if renumbered and result.adapters:
            result.notes.append("Because some adapter versions were skipped, the others were numbered again from 1.")

    def _import_links(self, p, gid: str, items: list[dict], result: ImportResult) -> None:
        now = datetime.now(timezone.utc)
        for item in items:
            label = str(item.get("label") or "")
            shown = f"'{label}'" if label else "without a label"
            if item.get("revoked"):
                result.skipped.append(f"The share link {shown} was revoked, so it was not recreated.")
                continue
            expires = _when(item.get("expires_at"))
            if expires is not None and expires <= now:
                result.skipped.append(f"The share link {shown} has expired, so it was not recreated.")
                continue
            public = item.get("policy") == "public"
            try:
                link, token = self.create_share_link(
                    p, gid, label=label, public=public,
                    emails=[] if public else list(item.get("allowed_emails") or []),
                    domains=[] if public else list(item.get("allowed_domains") or []),
                    expires=expires, quota=item.get("message_quota"))
            except InvalidInput as exc:
                result.skipped.append(f"The share link {shown} was not recreated: {exc}")
                continue
            result.share_links.append(NewShareLink(link.id, link.label, link.public, token))
        if result.share_links:
            result.notes.append("Share links were recreated with NEW addresses: send your clients the new links "
                                "(the old ones belong to the other copy).")

    # -- save as template ----------------------------------------------------------------------

    def save_as_template(self, p: Principal, gpt_id: str, *, key: str, title: str = "", description: str = "",
                         category: str = "My templates", test_questions: list[str] | None = None) -> Path:
        """Write one of ``p``'s GPTs as ``<templates dir>/<key>.yaml`` in the templates format
        (templates/README.md), so it loads with ``load_templates`` and renders back to the same
        instructions, starters and model settings. A GPT still shaped like the template it came
        from keeps that template's blanks (its values become the defaults). An existing key is a
        Conflict; the template catalog is reloaded afterwards."""
        import yaml

        from personal_gpt.templates import TEMPLATE_ID, parse_template

        key = (key or "").strip()
        if len(key) > 64 or not TEMPLATE_ID.match(key):
            raise InvalidInput("The template key must use lowercase letters, digits and hyphens, like my-shop-helper.")
        spec = self.get_gpt(p, gpt_id).spec
        folder = Path(self.settings.templates_dir)
        target = folder / f"{key}.yaml"
        if target.exists() or any(t.id == key for t in self.templates()):
            raise Conflict(f"There is already a template called '{key}': pick another key.")
        data = self._template_data(spec, key=key, title=title, description=description, category=category,
                                   test_questions=test_questions)
        text = "# Saved from a GPT by Personal GPTs (save as template).\n" + yaml.dump(
            data, Dumper=_template_dumper(), sort_keys=False, allow_unicode=True, width=100)
        parse_template(text, template_id=key)  # InvalidTemplate with a sentence if anything is off
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.yaml.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, target)  # never replaces a file that appeared meanwhile
        except FileExistsError:
            raise Conflict(f"There is already a template called '{key}': pick another key.") from None
        finally:
            tmp.unlink(missing_ok=True)
        self.__dict__.pop("catalog", None)  # the gallery shows it at once
        return target

    def _template_data(self, spec, *, key: str, title: str, description: str, category: str,
                       test_questions: list[str] | None) -> dict:
        from personal_gpt.errors import NotFound
        from personal_gpt.templates import MAX_TEMPLATE_INSTRUCTIONS, render

        source = None
        if spec.template_id:
            try:
                source = self.catalog.get(spec.template_id)
            except NotFound:
                source = None
        blanks = []
        instructions, starters = spec.instructions, list(spec.starters)
        if source is not None and source.blanks:
            try:
                again = render(source, spec.blanks)
            except InvalidInput:
                again = None
            values_ok = all("{" not in v and "}" not in v and len(v) <= 500 for v in spec.blanks.values())
            if again is not None and values_ok and again.instructions == spec.instructions \
                    and again.starters == spec.starters:
                instructions, starters = source.instructions, list(source.starters)
                for blank in source.blanks:
                    value = spec.blanks.get(blank.key, "") or blank.default
                    item = {"key": blank.key, "label": blank.label}
                    if blank.help:
                        item["help"] = blank.help
                    item["example"] = blank.example or value[:200]
                    item["required"] = blank.required
                    if value:
                        item["default"] = value
                    blanks.append(item)
        if not blanks:
            for where, text in [("instructions", instructions), *[("starters", s) for s in starters]]:
                if "{" in text or "}" in text:
                    raise InvalidInput(f"Templates cannot contain braces {{ }} outside blanks, and this GPT's {where} "
                                       "has some: rephrase without them, then save as a template.")
        if not instructions.strip():
            raise InvalidInput("This GPT has no instructions yet: write some before saving it as a template.")
        if len(instructions) > MAX_TEMPLATE_INSTRUCTIONS:
            raise InvalidInput(f"Templates hold at most {MAX_TEMPLATE_INSTRUCTIONS:,} characters of instructions; "
                               "shorten this GPT's instructions first.")
        text = " ".join((description or spec.description or "").split())
        if not text:
            raise InvalidInput("Write a one-sentence description for the template.")
        avatar = spec.avatar
        icon = avatar if avatar and not avatar.startswith("data:") and not avatar.isascii() \
            and not any(ch.isspace() for ch in avatar) and len(avatar) <= 16 else "🤖"
        questions = [q for q in (test_questions or []) if q.strip()]
        if not questions and source is not None:
            questions = list(source.test_questions)
        if not questions:
            questions = [s for s in spec.starters if "{" not in s and "}" not in s]
        for fallback in ("What can you help me with?", "How do I get started?",
                         "Can you help me with something you are not meant to?"):
            if len(questions) >= 3:
                break
            if fallback not in questions:
                questions.append(fallback)
        data = {
            "id": key, "name": " ".join((title or spec.name).split())[:80], "description": text,
            "icon": icon, "category": " ".join((category or "My templates").split())[:40],
            "instructions": instructions,
        }
        if blanks:
            data["blanks"] = blanks
        if starters:
            data["starters"] = starters
        if source is not None and source.suggested_knowledge:
            data["suggested_knowledge"] = list(source.suggested_knowledge)
        data["model"] = spec.generation.model_dump(mode="json")
        data["test_questions"] = questions[:20]
        return data
