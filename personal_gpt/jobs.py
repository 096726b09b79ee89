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
        from personal_gpt.knowledge.ingest import ingest_file

        file_ids: list[str] = list(job.payload.get("file_ids", []))
        total = max(1, len(file_ids))
        ready = failed = 0
        for i, fid in enumerate(file_ids):
            with self.svc.store.read() as conn:
                row = kstore.get_file(conn, job.gpt_id, fid)
            if row is None or row.status in ("ready", "failed"):
                if row is not None:
                    ready += row.status == "ready"
                    failed += row.status == "failed"
                continue  # removed meanwhile, or finished before a restart

            def stage(name: str, _fid=fid, _i=i, _row=row) -> None:
                with self.svc.store.tx() as conn:
                    kstore.set_file_status(conn, _fid, name)
                    kstore.update_job(conn, job.id, progress=(_i + (0.2 if name == "parsing" else 0.6)) / total,
                                      message=f"{'Reading' if name == 'parsing' else 'Indexing'} {_row.display_name} "
                                              f"({_i + 1} of {len(file_ids)})")

            try:
                result = ingest_file(self.svc.blobs.path(job.gpt_id, row.content_hash), row.display_name,
                                     self.svc.embedder, stage)
            except PersonalGptError as exc:
                failed += 1
                with self.svc.store.tx() as conn:
                    kstore.set_file_status(conn, fid, "failed", error=str(exc))
            except Exception:  # noqa: BLE001 - one bad file never stops the others
                log.exception("ingest of %s failed", fid)
                failed += 1
                with self.svc.store.tx() as conn:
                    kstore.set_file_status(conn, fid, "failed", error="The file could not be read: it may be damaged.")
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
