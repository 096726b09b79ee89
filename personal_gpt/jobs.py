"""Durable background jobs: queued -> running -> done/failed, with progress that
survives a page reload and a restart (running jobs are re-queued at start).

Today one kind runs here: ``ingest`` (knowledge files). The runner is a daemon
thread in whatever process owns the Services (the web server or the CLI);
claiming a job is an atomic update, so several processes can share one queue.
"""

from __future__ import annotations

import logging
import threading

from personal_gpt.errors import PersonalGptError
from personal_gpt.store import knowledge as kstore

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, services):
        self.svc = services
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def recover(self) -> list[str]:
        """After a crash or restart: re-queue interrupted jobs, sweep temp files."""
        with self.svc.store.tx() as conn:
            resumed = kstore.requeue_interrupted(conn, "ingest")
        if resumed:
            log.info("resuming %d interrupted ingest job(s)", len(resumed))
        self.svc.blobs.sweep()
        try:  # fine-tunes run in their own worker process: re-queue those whose worker died, wake one
            self.svc.recover_finetune()
        except Exception:  # noqa: BLE001 - never keep the app from starting
            log.exception("could not recover fine-tune jobs")
        return resumed

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self.recover()
            self._thread = threading.Thread(target=self._loop, name="personal-gpt-jobs", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run_until_idle(self) -> None:
        """Process queued jobs in the calling thread (the CLI waits this way)."""
        while self.run_one():
            pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_one()
            except Exception:  # noqa: BLE001 - a runner must not die; the job itself records failures
                log.exception("job runner error")
                worked = False
            if not worked:
                self._wake.wait(timeout=2.0)
                self._wake.clear()

    def run_one(self) -> bool:
        with self.svc.store.tx() as conn:
            job = kstore.claim_next_job(conn, "ingest")
        if job is None:
            return False
        self._run_ingest(job)
        return True

    def _run_ingest(self, job: kstore.JobRow) -> None:
        """One parse worker for the whole job (``ParseSession``), and one file read
        ahead: while this thread chunks and embeds file i, a helper thread waits
        on the worker parsing the next file, so the two run on two cores. Each
        file still goes queued -> parsing -> embedding -> ready/failed, and its
        chunks are saved only here, in one transaction with its status."""
        from concurrent.futures import Future, ThreadPoolExecutor

        from personal_gpt.knowledge.ingest import index_document, parse_upload
        from personal_gpt.knowledge.parse import ParseSession

        file_ids: list[str] = list(job.payload.get("file_ids", []))
        total = max(1, len(file_ids))
        ready = failed = 0
        ahead: dict[str, Future] = {}  # file id -> its parse, started while the file before it was embedding

        def pending(fid: str) -> kstore.KnowledgeFileRow | None:
            with self.svc.store.read() as conn:
                return kstore.get_file(conn, job.gpt_id, fid)

        def start_parse(row: kstore.KnowledgeFileRow) -> Future:
            return pool.submit(parse_upload, self.svc.blobs.path(job.gpt_id, row.content_hash), row.display_name,
                               session=session)

        def read_ahead(after: int) -> None:
            """Start parsing the next file that still needs it (its status says so)."""
            try:
                for nfid in file_ids[after + 1:]:
                    nrow = pending(nfid)
                    if nrow is None or nrow.status in ("ready", "failed"):
                        continue
                    with self.svc.store.tx() as conn:
                        kstore.set_file_status(conn, nfid, "parsing")
                    ahead[nfid] = start_parse(nrow)
                    return
            except Exception:  # noqa: BLE001 - reading ahead is an optimisation: the loop parses it anyway
                log.exception("could not start reading ahead in job %s", job.id)

        # Leaving the with-block closes the session first (ending a parse still in
        # flight), then the pool waits for its thread, which by then has returned.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="personal-gpt-parse") as pool, \
                ParseSession() as session:
            for i, fid in enumerate(file_ids):
                row = pending(fid)
                if row is None or row.status in ("ready", "failed"):
                    ahead.pop(fid, None)  # a parse read ahead for a file removed meanwhile is dropped
                    if row is not None:
                        ready += row.status == "ready"
                        failed += row.status == "failed"
                    continue  # removed meanwhile, or finished before a restart

                def stage(name: str, _fid=fid, _i=i, _row=row) -> None:
                    with self.svc.store.tx() as conn:
                        kstore.set_file_status(conn, _fid, name)
                        kstore.update_job(conn, job.id, progress=(_i + (0.2 if name == "parsing" else 0.6)) / total,
                                          message=f"{'Reading' if name == 'parsing' else 'Indexing'} "
                                                  f"{_row.display_name} ({_i + 1} of {len(file_ids)})")

                try:
                    stage("parsing")
                    parsing = ahead.pop(fid, None) or start_parse(row)
                    doc = parsing.result()
                    read_ahead(i)
                    result = index_document(doc, self.svc.embedder, stage)
                except PersonalGptError as exc:
                    failed += 1
                    with self.svc.store.tx() as conn:
                        kstore.set_file_status(conn, fid, "failed", error=str(exc))
                except Exception:  # noqa: BLE001 - one bad file never stops the others
                    log.exception("ingest of %s failed", fid)
                    failed += 1
                    with self.svc.store.tx() as conn:
                        kstore.set_file_status(conn, fid, "failed",
                                               error="The file could not be read: it may be damaged.")
                else:
                    with self.svc.store.tx() as conn:
                        if kstore.get_file(conn, job.gpt_id, fid) is not None:  # not removed while we worked
                            kstore.replace_chunks(conn, job.gpt_id, fid, result.rows)
                            kstore.set_file_status(conn, fid, "ready", error="", filetype=result.filetype,
                                                   pages=result.pages, chunk_count=len(result.rows))
                            ready += 1
                with self.svc.store.tx() as conn:
                    kstore.update_job(conn, job.id, progress=(i + 1) / total)
        summary = f"{ready} file{'s' if ready != 1 else ''} ready" + (f", {failed} failed" if failed else "")
        with self.svc.store.tx() as conn:
            kstore.update_job(conn, job.id, status="done", progress=1.0, message=summary)
