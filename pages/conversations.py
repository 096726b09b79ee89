"""Conversations: every conversation with one of your GPTs (preview, chat, share links, widget,
API), filters, reading one with its sources and feedback, and "Fix this answer"."""

from personal_gpt.web import conversations_view, glue

svc = glue.services()
me = glue.principal()
gpt_id = glue.selected_gpt_id()

if not gpt_id:
    glue.pick_gpt("Conversations", svc.list_gpts(me), "Conversations of",
                  "Make a GPT first; its conversations show up here.", "💬")

conversations_view.render(svc, me, gpt_id)
