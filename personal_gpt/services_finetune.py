"""The fine-tuning part of the services facade: training data, fine-tune jobs and
adapter versions. Mixed into ``Services``; every method takes the acting
Principal and checks the GPT is theirs before touching anything.

Training itself never runs here: ``start_finetune`` queues a job and wakes the
local worker process (``personal_gpt.finetune.worker``); this module only reads
the job's progress and manages the published adapter versions.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from personal_gpt.auth import Principal
from personal_gpt.errors import Conflict, InvalidInput, NotFound
from personal_gpt.store import finetune as fstore
from personal_gpt.store.repos import now

log = logging.getLogger(__name__)

MAX_EXAMPLES = 50_000
MAX_HELD_OUT_SAMPLES = 5
MAX_TEST_QUESTIONS = 3
JOB_ID_PREFIX = "ftj"


@dataclass
class FinetuneJob:
    """A fine-tune as the creator sees it. ``progress`` is 0–1; ``eta_s`` is the
    estimated seconds left while it runs; ``history`` holds one dict per logged
    step (``step``, ``loss``, ``eval_loss``…) for the live chart (only from
    ``finetune_job``)."""

    id: str
    gpt_id: str
    status: str  # queued, running, cancelling, done, failed, cancelled
    progress: float
    message: str
    eta_s: float | None
    step: int | None
    total_steps: int | None
    resumed_from: int | None
    attempts: int
    base_model: str
    settings: dict
    data_summary: dict
    adapter_number: int | None
    metrics: dict
    created_at: datetime
    updated_at: datetime
    history: list[dict] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in fstore.ACTIVE_STATES

    @property
    def finished(self) -> bool:
        return self.status in fstore.FINISHED_STATES

    def to_dict(self) -> dict:
        out = asdict(self)
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        out["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        return out


@dataclass
class AdapterVersion:
    """One trained adapter of a GPT: version ``number``; at most one is active."""

    id: str
    gpt_id: str
    number: int
    job_id: str | None
    base_model: str
    path: Path
    settings: dict
    data_summary: dict
    metrics: dict
    samples: list
    is_active: bool
    created_at: datetime

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        return out


@dataclass
class TrainingSet:
    """A data set saved by an earlier fine-tune (or brought in by an imported bundle)."""

    name: str  # the folder under the GPT's finetune/: a job id or "imported-N"
    label: str
    examples: int
    saved_at: datetime


_SET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _sentence_list(items: list[str], limit: int = 3) -> str:
    text = " ".join(items[:limit])
    if len(items) > limit:
        text += f" ({len(items) - limit} more problem{'s' if len(items) - limit != 1 else ''} not shown.)"
    return text


class FinetuneMethods:
    # -- plumbing ---------------------------------------------------------------------

    def _gpt_dir(self, gpt_id: str) -> Path:
        return self.settings.home / "gpts" / gpt_id

    def _home_path(self, relative: str) -> Path:
        """A path stored relative to the home (so a worker on another machine that
        mounts the same home at another place finds the same files)."""
        path = Path(relative)
        return path if path.is_absolute() else self.settings.home / path

    def _owned_gpt(self, p: Principal | int, gpt_id: str):
        uid = p if isinstance(p, int) else self._uid(p)
        with self.store.read() as conn:
            return uid, self._row(conn, uid, gpt_id)

    def _local_base(self, ref: str) -> tuple[str, str]:
        """(normalised reference, kind) of a model that can be fine-tuned here; an
        OpenAI-compatible model server gets a sentence instead."""
        from personal_gpt.models.registry import parse_ref

        key, kind, target = parse_ref(ref, self.settings.default_model)
        if kind == "openai":
            raise InvalidInput(
                "Fine-tuning works only with a model that runs on this computer (the bundled model or a local "
                "model folder); this GPT uses a model server. Switch its model in the builder first."
            )
        if kind == "hf" and not (Path(target) / "config.json").is_file():
            raise InvalidInput(f"The model folder {target} is missing or has no config.json, so it cannot be "
                               "fine-tuned.")
        return key, kind

    def _local_model_dir(self, ref: str) -> Path | None:
        """Where a local model's tokenizer files are (the bundled one once prepared)."""
        from personal_gpt.models.registry import parse_ref

        try:
            _, kind, target = parse_ref(ref, self.settings.default_model)
        except InvalidInput:
            return None
        if kind == "bundled":
            return self.settings.model_cache_dir / target
        return Path(target) if kind == "hf" else None

    def _token_counter(self, ref: str):
        """count(messages) -> tokens as training will see them: the model's chat
        template rendered and counted with the light ``tokenizers`` library (no
        torch); an estimate when the model's files are not there yet."""
        folder = self._local_model_dir(ref)
        tok = None
        if folder is not None and (folder / "tokenizer.json").is_file():
            if (ref or self.settings.default_model).startswith("bundled:"):
                tok = self._light_tokenizer()
            else:
                from tokenizers import Tokenizer

                try:
                    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
                except Exception:  # noqa: BLE001 - an odd tokenizer only costs exactness
                    log.warning("cannot read %s; estimating token counts", folder / "tokenizer.json")
        render = _chat_renderer(folder) if tok is not None else None

        def count(messages: list[dict]) -> int:
            if tok is None:
                return sum(math.ceil(len(m["content"]) / 3.5) + 5 for m in messages)
            text = render(messages) if render is not None else None
            if text is not None:
                return len(tok.encode(text, add_special_tokens=False).ids)
            # no usable template: each turn wrapped like <|im_start|>role\n … <|im_end|>\n
            return sum(len(tok.encode(m["content"]).ids) + 5 for m in messages)

        return count

    @staticmethod
    def _train_settings(settings: dict | None):
        from personal_gpt.finetune.train import settings_from

        return settings_from(dict(settings or {}))

    def _check_examples(self, ref: str, examples, train_settings):
        from personal_gpt.finetune.data import validate

        if not examples:
            raise InvalidInput("There are no training examples: upload a file or make pairs from your knowledge first.")
        if len(examples) > MAX_EXAMPLES:
            raise InvalidInput(f"That is too many examples ({len(examples):,}); use at most {MAX_EXAMPLES:,}.")
        return validate(list(examples), self._token_counter(ref), max_length=train_settings.max_length,
                        eval_share=train_settings.eval_share, seed=train_settings.seed)

    # -- training data ----------------------------------------------------------------

    def preview_training_data(self, p: Principal, gpt_id: str, data: bytes, filename: str,
                              prompt_column: str | None = None, response_column: str | None = None,
                              settings: dict | None = None):
        """Read an upload and check it the way ``start_finetune`` will: returns
        (Loaded, Report). A file that cannot be read raises InvalidInput."""
        from personal_gpt.finetune.data import load_examples

        _, row = self._owned_gpt(p, gpt_id)
        train_settings = self._train_settings(settings)
        loaded = load_examples(data or b"", filename or "", prompt_column=prompt_column,
                               response_column=response_column)
        ref = self.model_ref(self._gpt(row).spec)
        return loaded, self._check_examples(ref, loaded.examples, train_settings)

    def check_training_examples(self, p: Principal, gpt_id: str, examples: list, settings: dict | None = None):
        """The Report ``start_finetune`` would act on, for examples edited on screen
        (nothing is saved or queued). Bad settings raise InvalidInput."""
        _, row = self._owned_gpt(p, gpt_id)
        train_settings = self._train_settings(settings)
        if not examples:
            raise InvalidInput("There are no training examples: upload a file or make pairs from your knowledge first.")
        return self._check_examples(self.model_ref(self._gpt(row).spec), examples, train_settings)

    def training_pairs_from_knowledge(self, p: Principal, gpt_id: str, limit: int = 100):
        """Draft question/answer examples from the GPT's ready knowledge passages."""
        from personal_gpt.finetune.pairs import pairs_from_passages
        from personal_gpt.store import knowledge as kstore

        self._owned_gpt(p, gpt_id)
        if not 1 <= int(limit) <= 1000:
            raise InvalidInput("Ask for between 1 and 1,000 training pairs.")
        with self.store.read() as conn:
            chunks = kstore.ready_chunks(conn, gpt_id, with_embeddings=False)
        if not chunks:
            raise InvalidInput("This GPT has no ready knowledge files to make training pairs from; add some first.")
        passages = [{"text": c.text, "file": c.file_name, "page": c.page, "section": c.section} for c in chunks]
        return pairs_from_passages(passages, limit=int(limit))

    # -- jobs -------------------------------------------------------------------------

    def training_sets(self, p: Principal, gpt_id: str) -> list[TrainingSet]:
        """The data sets earlier fine-tunes saved (and imported bundles brought), newest
        first, so a creator can train again on them (after editing) without the file."""
        from datetime import timezone

        _, row = self._owned_gpt(p, gpt_id)
        root = self._gpt_dir(row.id) / "finetune"
        found = []
        for path in sorted(root.glob("*/dataset.jsonl")) if root.is_dir() else []:
            name = path.parent.name
            if not _SET_NAME.match(name) or path.is_symlink():
                continue
            with open(path, encoding="utf-8") as f:
                count = sum(1 for line in f if line.strip())
            saved = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
            what = "Imported with the GPT" if name.startswith("imported-") else "Used by the fine-tune of"
            label = f"{what} {saved:%d %b %Y, %H:%M} UTC ({count:,} example{'s' if count != 1 else ''})"
            found.append(TrainingSet(name, label, count, saved))
        return sorted(found, key=lambda t: t.saved_at, reverse=True)

    def load_training_set(self, p: Principal, gpt_id: str, name: str) -> list:
        """The examples of one of ``training_sets``; an unknown name raises NotFound."""
        from personal_gpt.finetune.data import read_jsonl

        _, row = self._owned_gpt(p, gpt_id)
        if not isinstance(name, str) or not _SET_NAME.match(name):
            raise NotFound("There is no saved training data with that name.")
        path = self._gpt_dir(row.id) / "finetune" / name / "dataset.jsonl"
        if not path.is_file() or path.is_symlink():
            raise NotFound("There is no saved training data with that name.")
        return read_jsonl(path)

    def start_finetune(self, p: Principal, gpt_id: str, examples: list, settings: dict | None = None, *,
                       start_worker: bool = True) -> str:
        """Check the settings and the data, save the dataset and its split under the
        GPT's folder, queue a ``finetune`` job and wake the local worker. Returns the
        job id. Bad data or settings raise InvalidInput and nothing is queued; a
        second job while one is queued or running raises Conflict."""
        from personal_gpt.finetune.data import write_jsonl

        _, row = self._owned_gpt(p, gpt_id)
        spec = self._gpt(row).spec
        base_model, _ = self._local_base(self.model_ref(spec))
        train_settings = self._train_settings(settings)
        report = self._check_examples(base_model, examples, train_settings)
        if not report.ok:
            raise InvalidInput(_sentence_list(report.errors))
        train, held_out = report.split()
        if not train:
            raise InvalidInput("There are no examples left to train on after the evaluation share; add more examples.")
        with self.store.read() as conn:
            if fstore.active_job(conn, gpt_id) is not None:
                raise Conflict("This GPT is already being fine-tuned: wait for that to finish or cancel it first.")

        job_id = fstore.new_job_id()
        rel_dir = Path("gpts") / gpt_id / "finetune" / job_id
        job_dir = self.settings.home / rel_dir
        try:
            write_jsonl(list(examples), job_dir / "dataset.jsonl")
            write_jsonl(train, job_dir / "train.jsonl")
            write_jsonl(held_out, job_dir / "eval.jsonl")
        except OSError as exc:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise InvalidInput(_disk_sentence(exc)) from None
        payload = {
            "dir": rel_dir.as_posix(),
            "base_model": base_model,
            "settings": train_settings.model_dump(mode="json"),
            "data_summary": report.to_dict(),
            "sample_prompts": self._sample_prompts(spec, held_out),
        }
        try:
            with self.store.tx() as conn:
                fstore.lock_gpt(conn, gpt_id)  # two starts on one GPT: the second waits here, then sees the first
                if fstore.active_job(conn, gpt_id) is not None:
                    raise Conflict("This GPT is already being fine-tuned: wait for that to finish or cancel it first.")
                fstore.insert_job(conn, gpt_id, payload, job_id=job_id)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        if start_worker:
            self.ensure_finetune_worker()
        return job_id

    def _sample_prompts(self, spec, held_out: list) -> list[list[dict]]:
        """What the worker compares base and tuned answers on: up to five held-out
        prompts (their conversation up to the last question) and the template's
        test questions (else the GPT's conversation starters)."""
        prompts: list[list[dict]] = []
        for ex in held_out[:MAX_HELD_OUT_SAMPLES]:
            messages = [dict(m) for m in ex.messages]
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if messages:
                prompts.append(messages)
        questions: list[str] = []
        if spec.template_id:
            try:
                questions = list(self.catalog.get(spec.template_id).test_questions)
            except NotFound:
                questions = []
        if not questions:
            questions = list(spec.starters)
        for q in questions[:MAX_TEST_QUESTIONS]:
            prompts.append([{"role": "user", "content": q}])
        return prompts

    def ensure_finetune_worker(self) -> bool:
        """Start the local worker process when none is running (True if one was started)."""
        from personal_gpt.finetune.worker import spawn_local_worker

        return spawn_local_worker(self.settings)

    def recover_finetune(self, start_worker: bool = True) -> list[str]:
        """At start-up: re-queue fine-tunes whose worker died (they resume from their
        last checkpoint) and start the local worker if any are waiting."""
        from personal_gpt.finetune.worker import sweep_dead_jobs

        requeued = sweep_dead_jobs(self.store)
        if start_worker:
            with self.store.read() as conn:
                waiting = fstore.count_queued(conn)
            if waiting:
                self.ensure_finetune_worker()
        return requeued

    def _heal_orphans(self, jobs: list[fstore.FinetuneJobRow]) -> None:
        """A waiting or running job while no local worker runs (it was killed, e.g.
        out of memory): sweep and start one, so the job does not wait for a restart."""
        if not any(j.status in fstore.ACTIVE_STATES for j in jobs):
            return
        from personal_gpt.finetune.worker import local_workers_enabled, worker_running

        if local_workers_enabled() and not worker_running(self.settings.home):
            try:
                self.recover_finetune()
            except Exception:  # noqa: BLE001 - showing the job matters more
                log.exception("could not restart the fine-tuning worker")

    def _job_view(self, row: fstore.FinetuneJobRow, history: list[fstore.MetricRow] | None = None) -> FinetuneJob:
        payload = row.payload
        live = dict(payload.get("live") or {})
        result = dict(payload.get("result") or {})
        eta = live.get("eta_s")
        if row.status == "running" and isinstance(eta, (int, float)):
            eta = max(0.0, float(eta) - max(0.0, (now() - row.updated_at).total_seconds()))
        else:
            eta = None
        steps: dict[int, dict] = {}
        for m in history or []:  # a resumed run logs steps after its checkpoint again: the latest wins
            steps.setdefault(m.step, {"step": m.step}).update(m.data)
        return FinetuneJob(
            id=row.id, gpt_id=row.gpt_id, status=row.status, progress=row.progress, message=row.message, eta_s=eta,
            step=live.get("step"), total_steps=live.get("total_steps"), resumed_from=live.get("resumed_from"),
            attempts=row.attempts, base_model=payload.get("base_model", ""), settings=dict(payload.get("settings") or {}),
            data_summary=dict(payload.get("data_summary") or {}), adapter_number=result.get("adapter_number"),
            metrics=dict(result.get("metrics") or {}), created_at=row.created_at, updated_at=row.updated_at,
            history=[steps[k] for k in sorted(steps)],
        )

    def finetune_jobs(self, p: Principal, gpt_id: str | None = None, limit: int = 20) -> list[FinetuneJob]:
        """A GPT's fine-tunes, newest first (all the person's GPTs when ``gpt_id`` is None)."""
        uid = self._uid(p)
        with self.store.read() as conn:
            if gpt_id is None:
                rows = fstore.list_owned_jobs(conn, uid, limit)
            else:
                self._row(conn, uid, gpt_id)
                rows = fstore.list_jobs(conn, gpt_id, limit)
        self._heal_orphans(rows)
        return [self._job_view(r) for r in rows]

    def _job_row(self, conn, gpt_id: str, job_id: str) -> fstore.FinetuneJobRow:
        from personal_gpt.services import _check_id

        row = fstore.get_job(conn, gpt_id, _check_id(job_id, "fine-tune job"))
        if row is None:
            raise NotFound("There is no fine-tune job with that id for this GPT.")
        return row

    def finetune_job(self, p: Principal, gpt_id: str, job_id: str) -> FinetuneJob:
        """One fine-tune with its metrics history (for the live loss chart)."""
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            row = self._job_row(conn, gpt_id, job_id)
            history = fstore.metrics(conn, row.id)
        self._heal_orphans([row])
        return self._job_view(row, history)

    def find_finetune_job(self, p: Principal, job_id: str) -> FinetuneJob:
        """A fine-tune of any of the person's GPTs, by id alone (the CLI)."""
        from personal_gpt.services import _check_id

        uid = self._uid(p)
        with self.store.read() as conn:
            row = fstore.find_owned_job(conn, uid, _check_id(job_id, "fine-tune job"))
            if row is None:
                raise NotFound("There is no fine-tune job with that id.")
            history = fstore.metrics(conn, row.id)
        return self._job_view(row, history)

    def cancel_finetune(self, p: Principal, gpt_id: str, job_id: str) -> FinetuneJob:
        """A queued job is cancelled at once; a running one stops at its next step
        (status ``cancelling`` until the worker has stopped). The active adapter is
        never touched."""
        uid = self._uid(p)
        with self.store.tx() as conn:
            self._row(conn, uid, gpt_id)
            row = self._job_row(conn, gpt_id, job_id)
            if fstore.request_cancel(conn, gpt_id, row.id) is None:
                raise InvalidInput(f"This fine-tune has already {row.status if row.status != 'done' else 'finished'}; "
                                   "there is nothing to cancel.")
        job_dir = row.payload.get("dir")
        with self.store.read() as conn:
            row = self._job_row(conn, gpt_id, job_id)
        if row.status == "cancelled" and job_dir:  # never started: no worker will clean up its files
            shutil.rmtree(self._home_path(job_dir), ignore_errors=True)
        return self._job_view(row)

    # -- adapters ---------------------------------------------------------------------

    def _adapter_view(self, row: fstore.AdapterRow) -> AdapterVersion:
        return AdapterVersion(
            id=row.id, gpt_id=row.gpt_id, number=row.number, job_id=row.job_id, base_model=row.base_model,
            path=self._home_path(row.path), settings=row.settings, data_summary=row.data_summary,
            metrics=row.metrics, samples=row.samples, is_active=row.is_active, created_at=row.created_at,
        )

    @staticmethod
    def _version_number(number) -> int:
        try:
            value = int(number)
        except (TypeError, ValueError):
            raise InvalidInput("An adapter version is a number, like 1 or 2.") from None
        if value < 1:
            raise InvalidInput("An adapter version is a number, like 1 or 2.")
        return value

    def list_adapters(self, p: Principal, gpt_id: str) -> list[AdapterVersion]:
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            return [self._adapter_view(r) for r in fstore.list_adapters(conn, gpt_id)]

    def get_adapter(self, p: Principal, gpt_id: str, number: int) -> AdapterVersion:
        number = self._version_number(number)
        uid = self._uid(p)
        with self.store.read() as conn:
            self._row(conn, uid, gpt_id)
            row = fstore.get_adapter(conn, gpt_id, number)
        if row is None:
            raise NotFound(f"This GPT has no adapter version {number}.")
        return self._adapter_view(row)

    def activate_adapter(self, p: Principal, gpt_id: str, number: int | None) -> AdapterVersion | None:
        """Make version ``number`` the one chats use, or None for the base model.
        One transaction: afterwards exactly one version (or none) is active."""
        number = None if number is None else self._version_number(number)
        uid = self._uid(p)
        with self.store.tx() as conn:
            row = self._row(conn, uid, gpt_id)
            if number is None:
                fstore.set_active(conn, gpt_id, None)
                return None
            adapter = fstore.get_adapter(conn, gpt_id, number)
            if adapter is None:
                raise NotFound(f"This GPT has no adapter version {number}.")
            current, _ = self._local_base(self.model_ref(self._gpt(row).spec))
            if adapter.base_model != current:
                raise InvalidInput(f"Version {number} was trained for another model than the one this GPT uses now; "
                                   "fine-tune again on the current model.")
            if not _adapter_complete(self._home_path(adapter.path)):
                raise InvalidInput(f"The files of version {number} are missing or incomplete; it cannot be used.")
            fstore.set_active(conn, gpt_id, number)
        return self.get_adapter(p, gpt_id, number)

    def active_adapter(self, p_or_owner: Principal | int, gpt_id: str) -> AdapterVersion | None:
        """The GPT's active adapter version, or None when it uses the base model.
        Takes the acting creator or the owner's user id (for callers that have
        already established access, e.g. a share link's chat)."""
        uid, _ = self._owned_gpt(p_or_owner, gpt_id)
        with self.store.read() as conn:
            row = fstore.active_adapter(conn, gpt_id)
        return self._adapter_view(row) if row is not None else None

    def delete_adapter(self, p: Principal, gpt_id: str, number: int) -> None:
        """Delete a version and its files. The active version is refused (switch to
        another version or the base model first), so chats never lose their model
        mid-conversation."""
        number = self._version_number(number)
        uid = self._uid(p)
        with self.store.tx() as conn:
            self._row(conn, uid, gpt_id)
            fstore.lock_gpt(conn, gpt_id)
            adapter = fstore.get_adapter(conn, gpt_id, number)
            if adapter is None:
                raise NotFound(f"This GPT has no adapter version {number}.")
            if adapter.is_active:
                raise Conflict(f"Version {number} is the one this GPT uses now: switch to another version or to the "
                               "base model first, then delete it.")
            fstore.delete_adapter(conn, gpt_id, number)
        if "models" in self.__dict__ and callable(getattr(self.models, "forget_adapter", None)):
            self.models.forget_adapter(adapter.id)  # chats still using it finish first
        path = self._home_path(adapter.path)
        if path.is_relative_to(self._gpt_dir(gpt_id)):
            shutil.rmtree(path, ignore_errors=True)

    def _base_model_dir(self, base_model: str) -> Path:
        from personal_gpt.models.registry import parse_ref

        _, kind, target = parse_ref(base_model, self.settings.default_model)
        if kind == "bundled":
            from personal_gpt.models.bundled import ensure_bundled_model

            return ensure_bundled_model(self.settings)
        if kind == "hf":
            return Path(target)
        raise InvalidInput("Only adapters of a local model can be merged.")

    def export_adapter(self, p: Principal, gpt_id: str, number: int, dest_dir, merged: bool = False) -> Path:
        """Copy version ``number`` into ``dest_dir`` (a PEFT adapter folder), or with
        ``merged`` a full model folder with the adapter merged into the base."""
        adapter = self.get_adapter(p, gpt_id, number)  # ownership first
        from personal_gpt.finetune import export

        if not _adapter_complete(adapter.path):
            raise InvalidInput(f"The files of version {adapter.number} are missing or incomplete; it cannot be exported.")
        dest = Path(dest_dir).expanduser()
        if merged:
            result = export.export_merged(self._base_model_dir(adapter.base_model), adapter.path, dest)
        else:
            result = export.export_adapter(adapter.path, dest)
        return Path(result) if result is not None else dest

    # -- the chat path ----------------------------------------------------------------

    def _chat_adapter(self, gpt_id: str, model_ref: str):
        """The AdapterRef the chat path loads for this GPT, or None: only a complete
        active version trained on the very model the GPT uses now."""
        from personal_gpt.models.registry import parse_ref

        try:
            key, kind, _ = parse_ref(model_ref, self.settings.default_model)
        except InvalidInput:
            return None
        if kind == "openai":
            return None
        with self.store.read() as conn:
            row = fstore.active_adapter(conn, gpt_id)
        if row is None or row.base_model != key:
            return None
        path = self._home_path(row.path)
        if not _adapter_complete(path):
            log.warning("active adapter %s of %s is incomplete; using the base model", row.id, gpt_id)
            return None
        from personal_gpt.models.base import AdapterRef

        return AdapterRef(name=row.id, path=path, label=f"fine-tune {row.number}")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _chat_renderer(folder: Path | None):
    """render(messages) -> the model's chat template applied (as training applies it),
    or None per call when it cannot be rendered; None when the model has no template."""
    if folder is None:
        return None
    template, special = None, {}
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        if isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
    except (OSError, ValueError, AttributeError):
        pass
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        return None
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        compiled = env.from_string(template)
    except Exception:  # noqa: BLE001 - no jinja2, or a template it cannot read: estimate instead
        log.warning("cannot read the chat template in %s; counting tokens per message", folder)
        return None

    def render(messages: list[dict]) -> str | None:
        try:
            return compiled.render(messages=messages, add_generation_prompt=False, **special)
        except Exception:  # noqa: BLE001 - e.g. a template that raises for this role order
            return None

    return render


def _adapter_complete(path: Path) -> bool:
    if not all((path / name).is_file() for name in ADAPTER_FILES):
        return False
    try:
        json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _disk_sentence(exc: OSError) -> str:
    import errno

    if exc.errno == errno.ENOSPC:
        return "The disk is full: free some space and start the fine-tune again."
    return f"The training data could not be saved ({exc.strerror or 'the folder cannot be written'})."
