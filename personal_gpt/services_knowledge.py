"""The knowledge part of the services facade: add, list, remove and search a
GPT's knowledge files. Mixed into ``Services``; every method takes the acting
Principal and checks the GPT is theirs before touching anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from personal_gpt.auth import Principal
from personal_gpt.errors import NotFound
from personal_gpt.knowledge.types import InvalidUpload, QuotaExceeded
from personal_gpt.store import knowledge as kstore

MAX_FILES_PER_UPLOAD = 50
I_DONT_KNOW = "I don't know — that isn't covered in my knowledge files."


@dataclass
class AddedFile:
    name: str
    file_id: str | None
    status: str  # queued, duplicate, rejected
    message: str = ""


@dataclass
class AddResult:
    files: list[AddedFile]
    job_id: str | None


class KnowledgeMethods:
    @cached_property
    def blobs(self):
        from personal_gpt.knowledge.blobs import BlobStore

        return BlobStore(self.settings.home)

    @cached_property
    def embedder(self):
        from personal_gpt.knowledge.embed import default_embedder

        return default_embedder()

    @cached_property
    def retriever(self):
        from personal_gpt.knowledge.retrieval import Retriever

        return Retriever(self.store, lambda: self.embedder)

    @cached_property
    def jobs(self):
        from personal_gpt.jobs import JobRunner

        return JobRunner(self)

    def _own_gpt(self, p: Principal, gpt_id: str):
        uid = self._uid(p)
        with self.store.read() as conn:
            return self._row(conn, uid, gpt_id)

    def add_knowledge(self, p: Principal, gpt_id: str, files: list[tuple[str, bytes]], run_jobs: bool = True) -> AddResult:
        """Store the uploads and queue one ingest job for the new ones. Each file gets
        its own outcome: a bad file is reported and the others still go in."""
        from personal_gpt.knowledge.sniff import safe_display_name

        self._own_gpt(p, gpt_id)
        if len(files) > MAX_FILES_PER_UPLOAD:
            raise QuotaExceeded(f"Upload at most {MAX_FILES_PER_UPLOAD} files at a time.")
        limit = self.settings.max_upload_mb * 2**20
        gpt_limit = self.settings.max_gpt_knowledge_mb * 2**20
        results: list[AddedFile] = []
        new_ids: list[str] = []
        for raw_name, data in files:
            name = safe_display_name(raw_name or "")
            if not data:
                results.append(AddedFile(name, None, "rejected", "The file is empty."))
                continue
            if len(data) > limit:
                results.append(AddedFile(name, None, "rejected",
                                         f"The file is larger than {self.settings.max_upload_mb} MB."))
                continue
            with self.store.read() as conn:
                used = kstore.total_size(conn, gpt_id)
            if used + len(data) > gpt_limit:
                results.append(AddedFile(name, None, "rejected",
                                         f"This GPT's knowledge would exceed {self.settings.max_gpt_knowledge_mb} MB; "
                                         "remove some files first."))
                continue
            digest = self.blobs.put(gpt_id, data)
            with self.store.tx() as conn:
                existing = kstore.find_by_hash(conn, gpt_id, digest)
                if existing is not None:
                    results.append(AddedFile(name, existing.id, "duplicate",
                                             f"Already added as {existing.display_name}."))
                    continue
                replaced = [f for f in kstore.find_by_name(conn, gpt_id, name)]
                for old in replaced:  # a changed file replaces its old version and chunks
                    kstore.delete_file(conn, gpt_id, old.id)
                fid = kstore.insert_file(conn, gpt_id, name, digest, len(data))
            for old in replaced:
                self._drop_blob_if_unused(gpt_id, old.content_hash)
            results.append(AddedFile(name, fid, "queued", "Replaces the earlier version." if replaced else ""))
            new_ids.append(fid)
        job_id = None
        if new_ids:
            with self.store.tx() as conn:
                job_id = kstore.insert_job(conn, gpt_id, "ingest", {"file_ids": new_ids})
            if run_jobs:
                self.jobs.wake()
        return AddResult(results, job_id)

    def _drop_blob_if_unused(self, gpt_id: str, content_hash: str) -> None:
        with self.store.read() as conn:
            if not kstore.hash_in_use(conn, gpt_id, content_hash):
                self.blobs.delete(gpt_id, content_hash)

    def list_knowledge(self, p: Principal, gpt_id: str) -> list[kstore.KnowledgeFileRow]:
        self._own_gpt(p, gpt_id)
        with self.store.read() as conn:
            return kstore.list_files(conn, gpt_id)

    def remove_knowledge(self, p: Principal, gpt_id: str, file_id: str) -> None:
        self._own_gpt(p, gpt_id)
        with self.store.tx() as conn:
            row = kstore.get_file(conn, gpt_id, str(file_id))
            if row is None or not kstore.delete_file(conn, gpt_id, row.id):
                raise NotFound("There is no knowledge file with that id in this GPT.")
        self._drop_blob_if_unused(gpt_id, row.content_hash)
        self.retriever.forget(gpt_id)

    def knowledge_jobs(self, p: Principal, gpt_id: str, limit: int = 5) -> list[kstore.JobRow]:
        self._own_gpt(p, gpt_id)
        with self.store.read() as conn:
            return kstore.list_jobs(conn, gpt_id, "ingest", limit)

    def search_knowledge(self, p: Principal, gpt_id: str, query: str, k: int = 5, mode: str = "hybrid"):
        self._own_gpt(p, gpt_id)
        query = (query or "").strip()
        if not query:
            raise InvalidUpload("Type something to search for.")
        if not 1 <= int(k) <= 50:
            raise InvalidUpload("Ask for between 1 and 50 results.")
        return self.retriever.search(gpt_id, query, k=int(k), mode=mode)
