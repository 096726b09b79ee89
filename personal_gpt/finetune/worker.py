"""The fine-tuning worker: a process of its own (never the web server's) that
claims queued ``finetune`` jobs from the shared database, runs ``train_lora``
with progress, heartbeat and cancel wired to the job row, compares base and
tuned answers, and publishes the adapter as a new, inactive version.

Run it as ``python -m personal_gpt.finetune.worker`` or ``personal-gpt worker``;
the services start one detached local worker on demand (one per home, held by a
``flock``), which exits after a minute without work. A worker on another machine
sharing a PostgreSQL database (and the home, for the files) works the same way.
Must not: change which adapter is active, or publish an incomplete directory.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from personal_gpt.errors import PersonalGptError
from personal_gpt.store import finetune as fstore

log = logging.getLogger(__name__)

LOCK_NAME = "finetune-worker.lock"
LOG_NAME = "finetune-worker.log"
DEFAULT_IDLE_EXIT_S = 60.0
HEARTBEAT_S = 15.0  # the job's updated_at is touched at least this often while it runs
STALE_AFTER_S = 180.0  # a running job silent this long has lost its worker (any host)
MAX_ATTEMPTS = 3
SWEEP_EVERY_S = 30.0  # how often a waiting worker looks for jobs whose worker died
WRITE_INTERVAL_S = 0.5  # at most two progress writes a second
STOP_CHECK_S = 1.0  # how often should_stop reads the job's status
TRAIN_SHARE = 0.9  # progress 0–0.9 is training; the rest is comparing answers and publishing
SAMPLE_MAX_NEW_TOKENS = 128
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

_RUNNING_HERE: set[str] = set()  # job ids this process is running (the sweep never re-queues them)


def host_name() -> str:
    return socket.gethostname()


def identity() -> dict:
    return {"host": host_name(), "pid": os.getpid(), "started_at": datetime.now(timezone.utc).isoformat()}


def pid_alive(pid) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    """A killed child its parent has not reaped yet still answers kill(0)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): trust kill(0)


# --- recovery --------------------------------------------------------------------------


def _worker_dead(job: fstore.FinetuneJobRow, stale_cutoff: datetime) -> tuple[bool, bool]:
    """(dead, known_dead): a worker on this host whose process is gone is known
    dead; any worker whose heartbeat is older than ``stale_cutoff`` is presumed dead."""
    worker = job.payload.get("worker") or {}
    if worker.get("host") == host_name():
        pid = worker.get("pid")
        mine = pid == os.getpid()
        if (mine and job.id not in _RUNNING_HERE) or (not mine and not pid_alive(pid)):
            return True, True
    return job.updated_at < stale_cutoff, False


def sweep_dead_jobs(store, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Re-queue running fine-tunes whose worker died (they resume from their last
    checkpoint); close those that were being cancelled or failed too often.
    Returns the ids put back in the queue."""
    requeued: list[str] = []
    cutoff = fstore.stale_before(stale_after_s)
    with store.read() as conn:
        candidates = fstore.unfinished_jobs(conn)
    for job in candidates:
        dead, known = _worker_dead(job, cutoff)
        if not dead:
            continue
        with store.tx() as conn:
            if job.status == "cancelling":
                fstore.close_dead_job(conn, job, "cancelled", "Cancelled.")
            elif job.attempts >= MAX_ATTEMPTS:
                fstore.close_dead_job(conn, job, "failed", f"Fine-tuning stopped unexpectedly {job.attempts} times, "
                                      "so it was given up; try again with fewer examples or a smaller maximum length.")
            elif fstore.requeue_job(conn, job, "The worker stopped; resuming from the last checkpoint…",
                                    None if known else cutoff):
                requeued.append(job.id)
    if requeued:
        log.info("re-queued %d fine-tune job(s) whose worker stopped: %s", len(requeued), ", ".join(requeued))
    return requeued


# --- one local worker per home ----------------------------------------------------------


class HomeLock:
    """An exclusive ``flock`` on ``<home>/finetune-worker.lock`` held by the running
    worker; released by the kernel when the process dies, however it dies."""

    def __init__(self, home: Path):
        self.path = Path(home) / LOCK_NAME
        self._file = None

    def acquire(self) -> bool:
        if self._file is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            finally:
                self._file.close()
                self._file = None


def worker_running(home: Path) -> bool:
    """Whether a worker holds this home's lock right now."""
    probe = HomeLock(home)
    if probe.acquire():
        probe.release()
        return False
    return True


def _child_env(settings) -> dict:
    env = dict(os.environ)
    env["PERSONAL_GPT_HOME"] = str(settings.home)
    env["PERSONAL_GPT_DATABASE_URL"] = settings.database_url
    env["PERSONAL_GPT_MODEL_CACHE"] = str(settings.model_cache_dir)
    env["PERSONAL_GPT_TEMPLATES_DIR"] = str(settings.templates_dir)
    env["PERSONAL_GPT_DEFAULT_MODEL"] = settings.default_model
    if settings.torch_threads:
        env["PERSONAL_GPT_TORCH_THREADS"] = str(settings.torch_threads)
    return env


def _idle_exit_from_env() -> float:
    try:
        return max(0.0, float(os.environ.get("PGPT_WORKER_IDLE_EXIT", DEFAULT_IDLE_EXIT_S)))
    except ValueError:
        return DEFAULT_IDLE_EXIT_S


def local_workers_enabled() -> bool:
    """False when the operator runs workers elsewhere (PGPT_FINETUNE_LOCAL_WORKER=0)."""
    return os.environ.get("PGPT_FINETUNE_LOCAL_WORKER", "1").strip().lower() not in ("0", "false", "no", "off")


def spawn_local_worker(settings, idle_exit_s: float | None = None) -> bool:
    """Start one detached worker process for this home unless one is running (or
    local workers are switched off). True when a new process was started. Its
    output goes to ``<home>/logs/finetune-worker.log``."""
    home = Path(settings.home)
    if not local_workers_enabled() or worker_running(home):
        return False
    idle = _idle_exit_from_env() if idle_exit_s is None else idle_exit_s
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / LOG_NAME, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "personal_gpt.finetune.worker", "--idle-exit", str(idle)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=_child_env(settings),
            start_new_session=True, close_fds=True,
        )
    # reap it when it exits, so no zombie is left behind in a long-running server
    threading.Thread(target=proc.wait, name="personal-gpt-worker-reaper", daemon=True).start()
    log.info("started fine-tuning worker pid %d", proc.pid)
    return True


# --- progress ------------------------------------------------------------------------


def _get(info, *names):
    for name in names:
        value = info.get(name) if isinstance(info, dict) else getattr(info, name, None)
        if value is not None:
            return value
    return None


def _number(value):
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out and abs(out) != float("inf") else None


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"about {max(seconds, 1)} s left"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left"


METRIC_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm", "epoch", "tokens_per_s", "perplexity")


class ProgressWriter:
    """``on_progress`` for train_lora: buffers per-step metrics and writes them with
    the job's progress, message and ETA at most every WRITE_INTERVAL_S."""

    def __init__(self, store, job_id: str, attempt: int, interval_s: float = WRITE_INTERVAL_S):
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        self.lost = False  # the job is no longer ours (re-queued elsewhere, deleted)
        self._pending: list[tuple[int, dict]] = []
        self._last_write = 0.0
        self._lock = threading.Lock()
        self.first_step: int | None = None
        self.resumed_from: int | None = None
        self.step: int | None = None
        self.total_steps: int | None = None
        self._started = time.monotonic()
        self._live: dict = {}
        self._message = "Training…"
        self._progress = 0.0

    def __call__(self, info) -> None:
        step = _number(_get(info, "step", "global_step"))
        total = _number(_get(info, "total_steps", "max_steps", "total"))
        resumed = _number(_get(info, "resumed_from", "resumed_from_step", "resume_step"))
        with self._lock:
            if total:
                self.total_steps = int(total)
            if resumed is not None and resumed > 0:
                self.resumed_from = int(resumed)
            if step is not None:
                self.step = int(step)
                if self.first_step is None:
                    self.first_step = int(step)
                data = {k: v for k in METRIC_KEYS if (v := _number(_get(info, k))) is not None}
                if data:
                    self._pending.append((int(step), data))
            eta = _number(_get(info, "eta_s", "eta", "eta_seconds"))
            fraction = _number(_get(info, "progress", "fraction"))
            if fraction is None and self.step is not None and self.total_steps:
                fraction = self.step / self.total_steps
            if eta is None and fraction and self.step is not None and self.first_step is not None:
                done_here = max(self.step - self.first_step + 1, 1)
                per_step = (time.monotonic() - self._started) / done_here
                eta = per_step * max((self.total_steps or 0) - self.step, 0) if self.total_steps else None
            phase = _get(info, "message", "phase")
            self._progress = TRAIN_SHARE * max(0.0, min(1.0, fraction or 0.0))
            self._message = self._describe(phase, eta, _number(_get(info, "loss")))
            self._live = {"step": self.step, "total_steps": self.total_steps, "eta_s": eta,
                          "resumed_from": self.resumed_from, "phase": "training"}
            due = time.monotonic() - self._last_write >= self.interval_s
            final = self.step is not None and self.total_steps is not None and self.step >= self.total_steps
        if due or final:
            self.flush()

    PHASES = {
        "eval-before": "Measuring the base model on the held-out examples…",
        "eval-after": "Measuring the tuned model on the held-out examples…",
        "saving": "Saving the adapter…",
    }

    def _describe(self, phase, eta, loss) -> str:
        if isinstance(phase, str) and phase in self.PHASES:
            return self.PHASES[phase]
        if self.step is None or not self.total_steps:
            return "Preparing the training…"
        text = f"Training: step {self.step} of {self.total_steps}"
        if loss is not None:
            text += f", loss {loss:.3f}"
        if self.resumed_from:
            text += f" (resumed from step {self.resumed_from})"
        if eta is not None:
            text += f" — {format_eta(eta)}"
        return text

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            live, message, progress = dict(self._live), self._message, self._progress
            self._last_write = time.monotonic()
        try:
            with self.store.tx() as conn:
                ok = fstore.report_progress(conn, self.job_id, self.attempt, progress=progress, message=message,
                                            live=live or None, metrics=pending)
        except Exception:  # noqa: BLE001 - a missed progress write must not stop the training
            log.exception("progress write for %s failed", self.job_id)
            with self._lock:
                self._pending = pending + self._pending
            return
        if not ok:
            self.lost = True

    def phase(self, progress: float, message: str, **live) -> None:
        with self._lock:
            self._progress, self._message = progress, message
            self._live = {**self._live, **live, "eta_s": None}
        self.flush()


class StopSignal:
    """``should_stop`` for train_lora: True once the job was cancelled, is no longer
    ours, or this worker is shutting down. Reads the database at most once a second."""

    def __init__(self, store, job_id: str, attempt: int, writer: ProgressWriter, shutdown: threading.Event):
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.writer = writer
        self.shutdown = shutdown
        self.cancelled = False
        self._checked = 0.0

    def __call__(self) -> bool:
        if self.shutdown.is_set() or self.writer.lost or self.cancelled:
            return True
        if time.monotonic() - self._checked >= STOP_CHECK_S:
            self._checked = time.monotonic()
            try:
                with self.store.read() as conn:
                    status = fstore.job_status(conn, self.job_id, self.attempt)
            except Exception:  # noqa: BLE001 - a busy database is not a cancel
                log.exception("status read for %s failed", self.job_id)
                return False
            if status is None:
                self.writer.lost = True
                return True
            if status == "cancelling":
                self.cancelled = True
                return True
        return False


class Heartbeat:
    """Touches the job's updated_at every HEARTBEAT_S while a job runs, even
    through long quiet phases (loading the model, comparing answers)."""

    def __init__(self, store, job_id: str, attempt: int, writer: ProgressWriter, every_s: float = HEARTBEAT_S):
        self.store, self.job_id, self.attempt, self.writer, self.every_s = store, job_id, attempt, writer, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="personal-gpt-heartbeat", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with self.store.tx() as conn:
                    if not fstore.report_progress(conn, self.job_id, self.attempt):
                        self.writer.lost = True
                        return
            except Exception:  # noqa: BLE001 - try again at the next beat
                log.exception("heartbeat for %s failed", self.job_id)


# --- running one job ------------------------------------------------------------------


def failure_sentence(exc: BaseException) -> str:
    """What the creator reads when a fine-tune fails."""
    if isinstance(exc, PersonalGptError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "The disk is full: free some space and start the fine-tune again."
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return ("The computer ran out of memory while training: try a smaller maximum length, a smaller batch "
                "size or fewer examples.")
    return "Fine-tuning failed unexpectedly; the worker's log has the details. Try again, or with other settings."


def adapter_complete(path: Path) -> bool:
    return all((Path(path) / name).is_file() for name in ADAPTER_FILES)


def base_model_dir(settings, base_model: str) -> Path:
    from personal_gpt.models.registry import parse_ref

    _, kind, target = parse_ref(base_model, settings.default_model)
    if kind == "bundled":
        from personal_gpt.models.bundled import ensure_bundled_model

        return ensure_bundled_model(settings)
    if kind == "hf":
        return Path(target)
    raise PersonalGptError("Fine-tuning works only with a model that runs on this computer.")


def _sample_tokens() -> int:
    try:
        return max(1, int(os.environ.get("PGPT_FINETUNE_SAMPLE_TOKENS", SAMPLE_MAX_NEW_TOKENS)))
    except ValueError:
        return SAMPLE_MAX_NEW_TOKENS


def _sample_prompts(payload: dict) -> list:
    """The prompts compare_answers gets: the saved conversations as they are."""
    return [p for p in payload.get("sample_prompts") or [] if p]


def _publish(adapter_src: Path, adapters_root: Path, adapter_id: str) -> Path:
    """Copy a finished adapter next to its final place and rename it in: the final
    folder appears complete or not at all."""
    if not adapter_complete(adapter_src):
        raise PersonalGptError("The training finished without a complete adapter, so nothing was saved.")
    adapters_root.mkdir(parents=True, exist_ok=True)
    tmp = adapters_root / f".tmp-{adapter_id}"
    final = adapters_root / adapter_id
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(adapter_src, tmp)
        for name in ADAPTER_FILES:  # flush the weights before the rename makes them visible
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if not adapter_complete(tmp):
            raise PersonalGptError("The adapter could not be copied completely, so nothing was saved.")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class _LostClaim(Exception):
    pass


class Worker:
    """Claims and runs fine-tune jobs one at a time."""

    def __init__(self, settings=None, services=None):
        if services is None:
            from personal_gpt.services import Services

            services = Services(settings)
        self.svc = services
        self.settings = services.settings
        self.store = services.store
        self.shutdown = threading.Event()
        self.identity = identity()
        self._last_sweep = float("-inf")

    def claim(self) -> fstore.FinetuneJobRow | None:
        with self.store.tx() as conn:
            return fstore.claim_next(conn, self.identity)

    def run_one(self) -> bool:
        """Sweep dead jobs (now and then), claim one and run it. False when there was none."""
        if time.monotonic() - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = time.monotonic()
            sweep_dead_jobs(self.store)
        job = self.claim()
        if job is None:
            return False
        self.run_job(job)
        return True

    def run_job(self, job: fstore.FinetuneJobRow) -> str:
        """Run a claimed job to its end; returns its final status."""
        _RUNNING_HERE.add(job.id)
        try:
            return self._run(job)
        finally:
            _RUNNING_HERE.discard(job.id)

    def _finish(self, job, status: str, message: str, result: dict | None = None) -> bool:
        with self.store.tx() as conn:
            return fstore.finish_job(conn, job.id, job.attempts, status, message, result)

    def _run(self, job: fstore.FinetuneJobRow) -> str:
        from personal_gpt.finetune.data import read_jsonl

        payload = job.payload
        job_dir = self.svc._home_path(payload["dir"])
        work_dir = job_dir / "work"
        writer = ProgressWriter(self.store, job.id, job.attempts)
        stop = StopSignal(self.store, job.id, job.attempts, writer, self.shutdown)
        log.info("fine-tune %s (GPT %s) attempt %d starting", job.id, job.gpt_id, job.attempts)
        published: Path | None = None
        try:
            with Heartbeat(self.store, job.id, job.attempts, writer):
                from personal_gpt.finetune.train import Cancelled, settings_from, train_lora

                try:
                    settings = settings_from(dict(payload.get("settings") or {}))
                    train = [list(ex.messages) for ex in read_jsonl(job_dir / "train.jsonl")]
                    held_out = [list(ex.messages) for ex in read_jsonl(job_dir / "eval.jsonl")]
                    writer.phase(0.0, "Loading the model…")
                    base_dir = base_model_dir(self.settings, payload["base_model"])
                    result = train_lora(base_dir, train, held_out, settings, work_dir, on_progress=writer,
                                        should_stop=stop, base_name=payload["base_model"],
                                        threads=self.settings.torch_threads)
                    writer.flush()
                    if writer.lost:
                        raise _LostClaim()
                    samples = self._samples(writer, stop, base_dir, Path(result.adapter_dir), payload)
                    if stop():
                        raise Cancelled()
                    writer.phase(0.98, "Saving the new adapter version…")
                    adapter_id = fstore.new_adapter_id()
                    published = _publish(Path(result.adapter_dir), job_dir.parent.parent / "adapters", adapter_id)
                    metrics = _jsonable(dict(result.metrics or {}))
                    with self.store.tx() as conn:
                        number = fstore.insert_adapter(
                            conn, job.gpt_id, adapter_id=adapter_id, job_id=job.id,
                            base_model=payload["base_model"],
                            path=published.relative_to(self.settings.home).as_posix()
                            if published.is_relative_to(self.settings.home) else str(published),
                            settings=dict(payload.get("settings") or {}),
                            data_summary=_data_summary(payload), metrics=metrics, samples=samples,
                        )
                        done = fstore.finish_job(
                            conn, job.id, job.attempts, "done", _done_message(number, metrics),
                            {"adapter_number": number, "adapter_id": adapter_id, "metrics": metrics},
                        )
                        if not done:
                            raise _LostClaim()  # rolls the adapter row back with it
                    published = None  # it is a version now: keep it
                    shutil.rmtree(work_dir, ignore_errors=True)  # checkpoints are no longer needed
                    log.info("fine-tune %s done: adapter version %d", job.id, number)
                    return "done"
                except Cancelled:
                    if writer.lost:
                        raise _LostClaim() from None
                    if self.shutdown.is_set() and not stop.cancelled:
                        with self.store.tx() as conn:
                            fstore.requeue_job(conn, _refreshed(conn, job),
                                               "Paused: the worker stopped; it resumes from the last checkpoint…")
                        log.info("fine-tune %s paused for shutdown", job.id)
                        return "queued"
                    self._finish(job, "cancelled", "Cancelled.")
                    shutil.rmtree(work_dir, ignore_errors=True)
                    return "cancelled"
        except _LostClaim:
            log.warning("fine-tune %s is no longer this worker's (re-queued, cancelled or deleted)", job.id)
            return "lost"
        except BaseException as exc:  # noqa: BLE001 - the job records every failure; the worker goes on
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            if interrupted:
                self.shutdown.set()
            elif isinstance(exc, PersonalGptError):
                log.warning("fine-tune %s failed: %s", job.id, exc)
            else:
                log.exception("fine-tune %s failed", job.id)
            if interrupted:  # not the job's fault: the next worker resumes it
                with self.store.tx() as conn:
                    fstore.requeue_job(conn, _refreshed(conn, job), "Paused: the worker stopped; it resumes from "
                                       "the last checkpoint…")
                raise
            self._finish(job, "failed", failure_sentence(exc))
            shutil.rmtree(work_dir, ignore_errors=True)
            return "failed"
        finally:
            if published is not None:  # never a version: the files go too
                shutil.rmtree(published, ignore_errors=True)
            self._forget_if_deleted(job, job_dir)

    def _forget_if_deleted(self, job: fstore.FinetuneJobRow, job_dir: Path) -> None:
        """The GPT was deleted while its job ran: leave none of the job's files behind."""
        try:
            with self.store.read() as conn:
                if fstore.get_job_by_id(conn, job.id) is not None:
                    return
        except Exception:  # noqa: BLE001 - unsure: keep the files
            return
        shutil.rmtree(job_dir, ignore_errors=True)
        for empty in (job_dir.parent, job_dir.parent.parent):  # finetune/, then the GPT's folder
            try:
                empty.rmdir()
            except OSError:
                break

    def _samples(self, writer: ProgressWriter, stop, base_dir: Path, adapter_dir: Path, payload: dict) -> list:
        prompts = _sample_prompts(payload)
        if not prompts:
            return []
        writer.phase(TRAIN_SHARE, f"Comparing answers on {len(prompts)} question{'s' if len(prompts) != 1 else ''}"
                                  " with the base model…")
        from personal_gpt.finetune.evaluate import compare_answers

        try:
            return _jsonable(list(compare_answers(base_dir, adapter_dir, prompts, max_new_tokens=_sample_tokens())))
        except PersonalGptError:
            raise
        except Exception:  # noqa: BLE001 - the adapter is good even when the side-by-side fails
            log.exception("comparing answers failed")
            return []

    def serve(self, *, once: bool = False, idle_exit_s: float | None = None, poll_s: float = 1.0,
              lock: HomeLock | None = None) -> int:
        """Work until told to stop: with ``once`` one job (if any) and out; with
        ``idle_exit_s`` out after that long without work. Returns jobs run."""
        ran = 0
        idle_since = time.monotonic()
        while not self.shutdown.is_set():
            try:
                worked = self.run_one()
            except Exception:  # noqa: BLE001 - e.g. the database is briefly unreachable: try again
                if once:
                    raise
                log.exception("the fine-tuning worker could not look for work")
                self.shutdown.wait(max(poll_s, 5.0))
                continue
            if worked:
                ran += 1
                idle_since = time.monotonic()
                if once:
                    break
                continue
            if once:
                break
            if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                # let go of the lock before the last look, so a job queued meanwhile
                # either is seen here or finds no worker and starts a new one
                if lock is not None:
                    lock.release()
                with self.store.read() as conn:
                    waiting = fstore.count_queued(conn)
                if not waiting or (lock is not None and not lock.acquire()):
                    break
                idle_since = time.monotonic()
                continue
            self.shutdown.wait(poll_s)
        return ran


def _refreshed(conn, job: fstore.FinetuneJobRow) -> fstore.FinetuneJobRow:
    return fstore.get_job_by_id(conn, job.id) or job


def _data_summary(payload: dict) -> dict:
    summary = dict(payload.get("data_summary") or {})
    keep = ("total", "usable", "train", "eval", "tokens_min", "tokens_median", "tokens_max", "max_length",
            "truncated", "duplicates", "empty", "eval_share", "seed", "warnings")
    return {k: summary[k] for k in keep if k in summary}


def _done_message(number: int, metrics: dict) -> str:
    before, after = _number(metrics.get("eval_loss_before")), _number(metrics.get("eval_loss_after"))
    text = f"Done: adapter version {number} is ready to try"
    if before is not None and after is not None:
        text += f" (held-out loss {before:.3f} → {after:.3f})"
    return text + "."


def _jsonable(value):
    """Metrics and samples as plain JSON (numbers that are not finite become None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    number = _number(value)
    if number is not None:
        return number
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value) if not isinstance(value, float) else None


def run_worker(settings=None, *, once: bool = False, idle_exit_s: float | None = None, poll_s: float = 1.0) -> int:
    """The worker process's main loop. Returns the number of jobs run; -1 when
    another worker already holds this home."""
    from personal_gpt.config import Settings

    settings = settings or Settings.from_env()
    settings.ensure_home()
    lock = HomeLock(settings.home)
    for _ in range(5):  # someone may be probing the lock this very moment (worker_running)
        if lock.acquire():
            break
        time.sleep(0.1)
    else:
        return -1
    worker = Worker(settings)

    def _stop(signum, _frame):
        log.info("signal %d: finishing the current step and stopping", signum)
        worker.shutdown.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _stop)
    try:
        sweep_dead_jobs(worker.store)
        return worker.serve(once=once, idle_exit_s=idle_exit_s, poll_s=poll_s, lock=lock)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.release()
        worker.svc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personal_gpt.finetune.worker",
                                     description="Run queued fine-tuning jobs.")
    parser.add_argument("--once", action="store_true", help="Run at most one queued job, then exit.")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                        help="Exit after this many seconds without work (default: keep waiting).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    ran = run_worker(once=args.once, idle_exit_s=args.idle_exit)
    if ran < 0:
        print("Another fine-tuning worker is already running for this home.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
