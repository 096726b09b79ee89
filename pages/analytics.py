"""Analytics: how a GPT (``?gpt=<id>``) or all of the creator's GPTs are used — tiles,
charts per day, busiest links/sites/keys, negative feedback, unanswered questions, time
to first token, and CSV downloads (neutralised against formula injection). All people's
and models' text is shown through st.dataframe (plain text, never HTML)."""

from datetime import datetime, timedelta, timezone

import streamlit as st

from personal_gpt.web import glue

PRESETS = {"Last 7 days": 7, "Last 30 days": 30, "Last 90 days": 90}
ALL = "__all__"

svc = glue.services()
me = glue.principal()

st.title("Analytics")
gpts = svc.list_gpts(me)
if not gpts:
    st.info("You have no GPTs yet: make one in My GPTs, share it, and its conversations are counted here.",
            icon="📊")
    st.stop()

names = {g.id: f"{g.avatar} {g.name}" for g in gpts}
wanted = glue.selected_gpt_id()
if wanted and wanted not in names:
    st.warning("There is no GPT with that id among yours; showing all your GPTs.", icon="⚠️")
    wanted = None
options = [ALL] + list(names)
top = st.columns([3, 4, 2])
choice = top[0].selectbox("GPT", options, index=options.index(wanted or ALL),
                          format_func=lambda k: "All GPTs" if k == ALL else names[k])
if choice == ALL and "gpt" in st.query_params:
    del st.query_params["gpt"]
elif choice != ALL and st.query_params.get("gpt") != choice:
    st.query_params["gpt"] = choice
gpt_id = None if choice == ALL else choice

today = datetime.now(timezone.utc).date()
period = top[1].radio("Period", [*PRESETS, "Custom"], index=1, horizontal=True)
if period == "Custom":
    picked = top[1].date_input("From – to (UTC days)", value=(today - timedelta(days=29), today), max_value=today,
                               key="analytics-range")
    picked = tuple(picked) if isinstance(picked, (tuple, list)) else (picked,)
    since, until = (picked[0], picked[-1]) if picked else (today - timedelta(days=29), today)
else:
    since, until = today - timedelta(days=PRESETS[period] - 1), today
include_test = top[2].toggle("Include evaluation runs", value=False,
                             help="Runs of the builder's Test tab are left out unless you ask for them.")

try:
    with st.spinner("Counting conversations…"):
        report = svc.analytics(me, gpt_id, since, until, include_test=include_test)
except glue.PersonalGptError as exc:
    st.error(str(exc), icon="⚠️")
    st.stop()

from personal_gpt import analytics as figures  # noqa: E402 (pandas: only once the page needs it)
from personal_gpt.csv_safe import to_csv_bytes  # noqa: E402

st.caption(f"{report.since:%d %b %Y} – {report.until:%d %b %Y} (UTC days)")
if report.empty:
    st.info("No conversations in this period yet. Share the GPT (Builder → Share) or chat with it, and the "
            "figures show up here.", icon="📭")
    st.stop()

t = report.totals
tiles = st.columns(6)
tiles[0].metric("Conversations", f"{t['conversations']:,}")
tiles[1].metric("Messages", f"{t['messages']:,}")
tiles[2].metric("People", f"{t['people']:,}")
tiles[3].metric("👍 Thumbs up", f"{t['thumbs_up']:,}")
tiles[4].metric("👎 Thumbs down", f"{t['thumbs_down']:,}")
tiles[5].metric("First token",
                "—" if t["median_first_token_s"] is None else f"{t['median_first_token_s']:.2f} s",
                help="Median seconds from a question to the first words of its answer; p90: "
                + ("—" if t["p90_first_token_s"] is None else f"{t['p90_first_token_s']:.2f} s"))

slug = "all-gpts" if gpt_id is None else gpt_id
span = f"{report.since:%Y%m%d}-{report.until:%Y%m%d}"


def download(label: str, frame, name: str) -> None:
    st.download_button(label, data=to_csv_bytes(frame), file_name=f"{slug}-{name}-{span}.csv", mime="text/csv",
                       icon="⬇️", key=f"csv-{name}", on_click="ignore")


download("Conversations (CSV, one row per message)", figures.conversations_export(report.messages), "conversations")

st.subheader("Per day")
daily = report.per_day.set_index("day")
charts = st.columns(2)
charts[0].caption("Conversations and people")
charts[0].line_chart(daily[["conversations", "people"]])
charts[1].caption("Messages (questions and answers)")
charts[1].bar_chart(daily[["messages"]])
download("Per day (CSV)", report.per_day, "per-day")

st.subheader("Time to first token")
if len(report.first_token):
    # the whole period on the x axis (days without answers are gaps), like the charts above
    timed = report.first_token.set_index("day")[["median_s", "p90_s"]].reindex(daily.index)
    st.line_chart(timed, y_label="seconds")
    download("Time to first token (CSV)", report.first_token, "first-token")
else:
    st.caption("No timed answers in this period.")

if report.per_gpt is not None:
    st.subheader("By GPT")
    st.dataframe(report.per_gpt.drop(columns=["gpt_id"]), hide_index=True, width="stretch")
    download("By GPT (CSV)", report.per_gpt, "by-gpt")

st.subheader("Busiest links, sites and API keys")
for title, frame, name in (("Share links", report.links, "links"), ("Web sites (widget)", report.sites, "sites"),
                           ("API keys", report.api_keys, "api-keys")):
    st.markdown(f"**{title}**")
    if len(frame):
        st.dataframe(frame, hide_index=True, width="stretch")
        download(f"{title} (CSV)", frame, name)
    else:
        st.caption("None in this period.")

WHEN = st.column_config.DatetimeColumn("when", format="D MMM YYYY, HH:mm", timezone="UTC")

st.subheader("Answers with negative feedback")
if len(report.negative_feedback):
    st.dataframe(report.negative_feedback.drop(columns=["message_id"]), hide_index=True, width="stretch",
                 column_config={"when": WHEN})
    download("Negative feedback (CSV)", report.negative_feedback, "negative-feedback")
else:
    st.caption("No 👎 in this period.")

st.subheader("Questions the knowledge could not answer")
st.caption(f"Answers where retrieval found no passage, the best evidence scored under {figures.LOW_EVIDENCE:.2f}, "
           "or a knowledge-only GPT declined. Add what is missing to the GPT's knowledge.")
if len(report.unanswered):
    st.dataframe(report.unanswered.drop(columns=["message_id"]), hide_index=True, width="stretch",
                 column_config={"when": WHEN, "best_evidence": st.column_config.NumberColumn(format="%.2f")})
    download("Unanswered questions (CSV)", report.unanswered, "unanswered")
else:
    st.caption("None in this period (or the GPT has no knowledge files).")
