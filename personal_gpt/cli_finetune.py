"""`personal-gpt` commands for finetune; registered on the main group by cli.py.

``finetune GPT DATA_FILE`` (check the data, queue a job, optionally wait with a
progress bar), ``finetune status`` / ``finetune cancel``, ``adapters list |
activate | delete | export`` and ``worker`` (run queued fine-tunes here).
Everything goes through the services; training runs in the worker process.
"""

from __future__ import annotations

import sys
import time

import click

FINETUNE_SUBCOMMANDS = ("start", "status", "cancel")


class FinetuneGroup(click.Group):
    """``personal-gpt finetune GPT DATA_FILE …`` is short for ``finetune start GPT
    DATA_FILE …``; ``finetune status`` and ``finetune cancel JOB`` stay subcommands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


def _job_line(job) -> str:
    pct = f"{round(job.progress * 100):>3d}%"
    extra = f"  → adapter v{job.adapter_number}" if job.adapter_number else ""
    return f"{job.id}  {job.status:<10} {pct}  {job.message}{extra}"


def _job_json(job, history: bool = False) -> dict:
    data = job.to_dict()
    if not history:
        data.pop("history", None)
    return data


def _metric(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def register(main) -> None:
    """Add this module's commands to the `personal-gpt` group."""
    from personal_gpt.cli import _dump, _principal, _services, friendly
    from personal_gpt.errors import InvalidInput, PersonalGptError

    @main.group("finetune", cls=FinetuneGroup, invoke_without_command=False)
    def finetune_group():
        """Fine-tune a GPT on your own examples: personal-gpt finetune GPT DATA_FILE.

        The data file is JSONL/JSON (OpenAI chat, Alpaca or ShareGPT), CSV or Excel
        with prompt and response columns. Training runs in a background worker; the
        result is a new adapter version that you switch on with `personal-gpt adapters
        activate`."""

    @finetune_group.command("start")
    @click.argument("gpt_id")
    @click.argument("data_file", type=click.Path(dir_okay=False))
    @click.option("--epochs", type=int, default=None, help="Passes over the training data.")
    @click.option("--rank", type=int, default=None, help="LoRA rank (adapter size).")
    @click.option("--lr", "learning_rate", type=float, default=None, help="Learning rate.")
    @click.option("--max-length", type=int, default=None, help="Longest example in tokens (longer ones are cut).")
    @click.option("--prompt-column", default=None, help="Table column with the prompts (CSV/Excel).")
    @click.option("--response-column", default=None, help="Table column with the answers (CSV/Excel).")
    @click.option("--wait", is_flag=True, help="Wait for the training with a progress bar.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @friendly
    def finetune_start_cmd(gpt_id, data_file, epochs, rank, learning_rate, max_length, prompt_column,
                           response_column, wait, as_json):
        """Check DATA_FILE, then fine-tune the GPT on it (prints the job id)."""
        from pathlib import Path

        try:
            data = Path(data_file).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"Cannot read {data_file}: {exc.strerror or 'unreadable'}.") from None
        settings = {k: v for k, v in {"epochs": epochs, "rank": rank, "learning_rate": learning_rate,
                                      "max_length": max_length}.items() if v is not None}
        svc = _services()
        p = _principal()
        loaded, report = svc.preview_training_data(p, gpt_id, data, Path(data_file).name, prompt_column,
                                                   response_column, settings)
        if not report.ok:
            raise InvalidInput(" ".join(report.errors))
        job_id = svc.start_finetune(p, gpt_id, loaded.examples, settings)
        if not as_json:
            click.echo(f"{report.usable} usable example{'s' if report.usable != 1 else ''} ({loaded.format}): "
                       f"{report.train} to train on, {report.eval} held out; "
                       f"tokens {report.tokens_min}–{report.tokens_max} (median {report.tokens_median:g}).")
            for note in list(loaded.problems) + list(report.warnings):
                click.echo(f"Note: {note}", err=True)
            click.echo(f"Fine-tune queued: {job_id}")
        if not wait:
            if as_json:
                _dump({"job": job_id, "report": report.to_dict(), "format": loaded.format,
                       "problems": list(loaded.problems)})
            return
        job = _wait(svc, p, gpt_id, job_id, quiet=as_json)
        if as_json:
            _dump({"job": job_id, "report": report.to_dict(), "format": loaded.format,
                   "problems": list(loaded.problems), "result": _job_json(job)})
        else:
            if job.status == "done":
                m = job.metrics
                click.echo(f"Held-out loss: {_metric(m.get('eval_loss_before'))} → {_metric(m.get('eval_loss_after'))}"
                           f"  (perplexity {_metric(m.get('perplexity_before'))} → "
                           f"{_metric(m.get('perplexity_after'))})")
                click.echo(f"New adapter: version {job.adapter_number} (not active yet: "
                           f"personal-gpt adapters activate {gpt_id} {job.adapter_number})")
            else:
                click.echo(f"Fine-tune {job.status}: {job.message}", err=True)
        if job.status != "done":
            sys.exit(1)

    def _wait(svc, p, gpt_id, job_id, quiet: bool):
        job = svc.finetune_job(p, gpt_id, job_id)
        if quiet:
            while not job.finished:
                time.sleep(1.0)
                job = svc.finetune_job(p, gpt_id, job_id)
            return job
        try:
            with click.progressbar(length=1000, label="Fine-tuning", show_eta=True, show_percent=True,
                                   item_show_func=lambda _: (job.message or "")[:60], file=sys.stderr) as bar:
                shown = 0
                while True:
                    job = svc.finetune_job(p, gpt_id, job_id)
                    target = int(job.progress * 1000)
                    if target > shown:
                        bar.update(target - shown)
                        shown = target
                    else:
                        bar.render_progress()
                    if job.finished:
                        break
                    time.sleep(1.0)
        except KeyboardInterrupt:
            click.echo(f"\nStopped waiting; the fine-tune goes on. Cancel it with: personal-gpt finetune cancel "
                       f"{job_id}", err=True)
            sys.exit(130)
        return job

    @finetune_group.command("status")
    @click.argument("job_id", required=False)
    @click.option("--gpt", "gpt_id", default=None, help="Only this GPT's fine-tunes.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @friendly
    def finetune_status_cmd(job_id, gpt_id, as_json):
        """Show one fine-tune (JOB) or the latest ones."""
        svc = _services()
        p = _principal()
        if job_id:
            job = svc.find_finetune_job(p, job_id)
            if gpt_id and job.gpt_id != gpt_id:
                raise PersonalGptError("That fine-tune belongs to another GPT.")
            if as_json:
                _dump(_job_json(job, history=True))
                return
            click.echo(_job_line(job))
            if job.history:
                last = job.history[-1]
                click.echo(f"  last logged step {last['step']}: loss {_metric(last.get('loss'))}")
            if job.metrics:
                click.echo(f"  held-out loss {_metric(job.metrics.get('eval_loss_before'))} → "
                           f"{_metric(job.metrics.get('eval_loss_after'))}")
            return
        jobs = svc.finetune_jobs(p, gpt_id)
        if as_json:
            _dump([_job_json(j) for j in jobs])
            return
        if not jobs:
            click.echo("No fine-tunes yet: personal-gpt finetune GPT DATA_FILE")
        for job in jobs:
            click.echo(_job_line(job))

    @finetune_group.command("cancel")
    @click.argument("job_id")
    @friendly
    def finetune_cancel_cmd(job_id):
        """Cancel a queued or running fine-tune."""
        svc = _services()
        p = _principal()
        job = svc.find_finetune_job(p, job_id)
        job = svc.cancel_finetune(p, job.gpt_id, job.id)
        click.echo("Cancelled." if job.status == "cancelled" else "Stopping: the worker ends it at its next step.")

    @main.group("adapters")
    def adapters_group():
        """List, switch on, delete and export a GPT's fine-tuned adapter versions."""

    @adapters_group.command("list")
    @click.argument("gpt_id")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @friendly
    def adapters_list_cmd(gpt_id, as_json):
        """List a GPT's adapter versions (* = in use)."""
        items = _services().list_adapters(_principal(), gpt_id)
        if as_json:
            _dump([a.to_dict() for a in items])
            return
        if not items:
            click.echo("No adapter versions yet: personal-gpt finetune GPT DATA_FILE")
        for a in items:
            mark = "*" if a.is_active else " "
            click.echo(f"{mark} v{a.number}  {a.created_at:%Y-%m-%d %H:%M}  "
                       f"held-out loss {_metric(a.metrics.get('eval_loss_before'))} → "
                       f"{_metric(a.metrics.get('eval_loss_after'))}  "
                       f"({a.data_summary.get('train', '?')} examples, {a.settings.get('epochs', '?')} epochs)")
        if not any(a.is_active for a in items) and items:
            click.echo("  (the base model is in use)")

    def _version(value: str):
        if value.strip().lower() in ("base", "none", "off"):
            return None
        try:
            return int(value.strip().lstrip("vV"))
        except ValueError:
            raise InvalidInput("VERSION is a number like 2, or 'base' to use the base model.") from None

    @adapters_group.command("activate")
    @click.argument("gpt_id")
    @click.argument("version")
    @friendly
    def adapters_activate_cmd(gpt_id, version):
        """Make VERSION the adapter chats use (`base` or `none` switches it off)."""
        adapter = _services().activate_adapter(_principal(), gpt_id, _version(version))
        click.echo("The GPT now uses the base model." if adapter is None
                   else f"The GPT now uses adapter version {adapter.number}.")

    @adapters_group.command("delete")
    @click.argument("gpt_id")
    @click.argument("version", type=int)
    @friendly
    def adapters_delete_cmd(gpt_id, version):
        """Delete an adapter version (not the one in use)."""
        _services().delete_adapter(_principal(), gpt_id, version)
        click.echo(f"Deleted version {version}.")

    @adapters_group.command("export")
    @click.argument("gpt_id")
    @click.argument("version", type=int)
    @click.argument("dest", type=click.Path(file_okay=False))
    @click.option("--merged", is_flag=True, help="Write a full model with the adapter merged in.")
    @friendly
    def adapters_export_cmd(gpt_id, version, dest, merged):
        """Copy adapter VERSION into DIR (a PEFT folder, or a merged model with --merged)."""
        path = _services().export_adapter(_principal(), gpt_id, version, dest, merged=merged)
        click.echo(f"Exported {'merged model' if merged else 'adapter'} version {version} to {path}")

    @main.command("worker")
    @click.option("--once", is_flag=True, help="Run at most one queued fine-tune, then exit.")
    @click.option("--idle-exit", "idle_exit", type=float, default=None, metavar="SECONDS",
                  help="Exit after this many seconds without work (default: keep waiting).")
    @friendly
    def worker_cmd(once, idle_exit):
        """Run queued fine-tunes on this machine (a GPU machine can share the database)."""
        import logging

        from personal_gpt.finetune.worker import run_worker

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        ran = run_worker(once=once, idle_exit_s=idle_exit)
        if ran < 0:
            click.echo("Another fine-tuning worker is already running for this home.", err=True)
        else:
            click.echo(f"Ran {ran} fine-tune job{'s' if ran != 1 else ''}.", err=True)
