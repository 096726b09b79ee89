"""`personal-gpt eval GPT QUESTIONS.jsonl [--json]`: ask a GPT a file of test
questions through the real chat path and print answer containment, abstention on
unanswerables, false abstention and citation accuracy. Registered by cli.py;
the scoring lives in ``qa_eval``.
"""

from __future__ import annotations

import click


def register(main) -> None:
    """Add the `eval` command to the `personal-gpt` group."""
    from personal_gpt import cli
    from personal_gpt.cli import _dump, _principal, friendly

    @main.command("eval")
    @click.argument("gpt_id")
    @click.argument("questions", type=click.Path(dir_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="Print the figures and every answer as JSON.")
    @click.option("--draft", is_flag=True, help="Use the latest draft instead of the published version.")
    @friendly
    def eval_cmd(gpt_id, questions, as_json, draft):
        """Ask GPT_ID every question in QUESTIONS (JSON lines: "question", optional "answers",
        optional "unanswerable": true, optional "file") and score the answers."""
        from personal_gpt import qa_eval

        items = qa_eval.load_questions(questions)
        svc = cli._services()
        p = _principal()
        gpt = svc.get_gpt(p, gpt_id)
        spec = gpt.spec if (draft or gpt.published_version is None) else None

        def progress(done, total):
            if not as_json:
                click.echo(f"\r{done}/{total} questions", nl=done == total, err=True)

        report = qa_eval.run_eval(svc, p, gpt_id, items, spec=spec, progress=progress)
        if as_json:
            _dump(report.to_dict())
        else:
            click.echo(qa_eval.format_report(report))
