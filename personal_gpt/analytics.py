"""Analytics figures as tables: pure functions from plain rows to pandas DataFrames.

Owns how every figure on the analytics page is counted (see docs/analytics.md):
per-day counts, unique people, busiest links/sites/keys, negative feedback,
questions the knowledge could not answer, time to first token, totals. It never
reads the database (``personal_gpt.store.analytics`` does) and never imports
streamlit. pandas is imported at module level, so only import this module lazily
(inside functions or on the analytics page), never on the first page render.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timezone
from typing import Any, Iterable

import pandas as pd

# Below this best-evidence score the knowledge is taken not to cover a question. It is
# the strictest relevance threshold of knowledge/grounding.py (THRESHOLDS["strict"].relevance
# = 0.20, calibrated on SQuAD 2.0): under it even a "strict" knowledge-only GPT refuses
# without asking the model; the "lenient" and "balanced" levels set no relevance floor at
# all (0.00), so they would flag nothing. tests/unit/test_analytics.py keeps the two equal.
LOW_EVIDENCE = 0.20
NOT_RECORDED = "Not recorded (privacy setting)"

SOURCE_LABELS = {
    "preview": "Builder preview",
    "chat": "Chat page",
    "cli": "Command line",
    "test": "Evaluation run",
}

CONVERSATION_COLUMNS = ["conversation_id", "gpt_id", "gpt", "source", "where", "person_id", "person",
                        "started_at", "day"]
MESSAGE_COLUMNS = ["message_id", "conversation_id", "gpt_id", "gpt", "source", "where", "person_id", "person",
                   "role", "text", "unrecorded", "created_at", "day", "rating", "comment", "feedback_at",
                   "first_token_s", "passages", "best_evidence", "grounding_action", "grounding_reason"]


# -- labels -------------------------------------------------------------------------


def where_label(row: dict) -> str:
    """Where a conversation came from, in the creator's words: the share link's label,
    the widget's site, the API key's name, or the app page."""
    source = row.get("source") or ""
    if source == "share":
        if row.get("link_label"):
            return str(row["link_label"])
        link = row.get("share_link_id")
        return f"Link …{str(link)[-6:]}" if link else "Deleted link"
    if source == "embed":
        return str(row.get("site") or "Widget")
    if source == "api":
        if row.get("key_name"):
            return str(row["key_name"])
        if row.get("key_hint"):
            return f"Key …{row['key_hint']}"
        return "Key …" + str(row["api_key_id"])[-4:] if row.get("api_key_id") else "Deleted key"
    return SOURCE_LABELS.get(source, source)


def _short(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:6]


def person_label(row: dict) -> str:
    """Who had a conversation: "You" (the GPT's owner), a verified e-mail, or a stable
    pseudonym (a short hash of the visitor id, never the id itself)."""
    if row.get("is_owner"):
        return "You"
    if row.get("email"):
        return str(row["email"])
    issuer, subject = str(row.get("issuer") or ""), str(row.get("subject") or "")
    if issuer == "visitor":
        return f"Visitor {_short(subject)}"
    if issuer == "api":
        _key, _, user = subject.partition(":")
        return f"API caller {user}" if user else "API caller"
    return f"Signed-in person {_short(issuer + ' ' + subject)}"


# -- frames -------------------------------------------------------------------------


def _utc_day(values) -> pd.Series:
    """UTC calendar day (midnight, tz-naive) of each timestamp."""
    ts = pd.to_datetime(pd.Series(values, dtype=object), utc=True)
    return ts.dt.tz_convert(None).dt.normalize()


def _utc(values) -> pd.Series:
    return pd.to_datetime(pd.Series(values, dtype=object), utc=True)


def conversations_frame(rows: Iterable[dict] | pd.DataFrame) -> pd.DataFrame:
    """Conversation rows (``store.analytics.conversation_rows``) as a table with where/person labels."""
    rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    if not rows:
        return _empty(CONVERSATION_COLUMNS)
    out = pd.DataFrame({
        "conversation_id": [r["conversation_id"] for r in rows],
        "gpt_id": [r["gpt_id"] for r in rows],
        "gpt": [r.get("gpt_name") or r["gpt_id"] for r in rows],
        "source": [r["source"] for r in rows],
        "where": [where_label(r) for r in rows],
        "person_id": [r["person_id"] for r in rows],
        "person": [person_label(r) for r in rows],
        "started_at": _utc([r["started_at"] for r in rows]),
    })
    out["day"] = _utc_day(out["started_at"])
    return out


def _num(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def messages_frame(rows: Iterable[dict] | pd.DataFrame) -> pd.DataFrame:
    """Message rows (``store.analytics.message_rows``) as a table: labels, the answer's
    rating, and the figures kept in ``meta`` (first token, retrieval, grounding).
    Unrecorded turns (``meta.unrecorded``) keep their counts but never their text."""
    rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    if not rows:
        return _empty(MESSAGE_COLUMNS)
    recs = []
    for r in rows:
        meta = r.get("meta") or {}
        retrieval = meta.get("retrieval") if isinstance(meta.get("retrieval"), dict) else None
        grounding = meta.get("grounding") if isinstance(meta.get("grounding"), dict) else {}
        unrecorded = bool(meta.get("unrecorded"))
        rating = r.get("rating")
        recs.append({
            "message_id": r["message_id"], "conversation_id": r["conversation_id"], "gpt_id": r["gpt_id"],
            "gpt": r.get("gpt_name") or r["gpt_id"], "source": r["source"], "where": where_label(r),
            "person_id": r["person_id"], "person": person_label(r), "role": r["role"],
            "text": NOT_RECORDED if unrecorded else (r.get("content") or ""), "unrecorded": unrecorded,
            "created_at": r["created_at"],
            "rating": int(rating) if rating is not None else None,
            "comment": (r.get("feedback_comment") or "") if rating is not None else "",
            "feedback_at": r.get("feedback_at"),
            "first_token_s": _num(meta.get("first_token_s")) if r["role"] == "assistant" else None,
            "passages": _num(retrieval.get("passages")) if retrieval else None,
            "best_evidence": _num(retrieval.get("best_evidence")) if retrieval else None,
            "grounding_action": str(grounding.get("action") or ""),
            "grounding_reason": str(grounding.get("reason") or ""),
        })
    out = pd.DataFrame.from_records(recs)
    out["created_at"] = _utc(out["created_at"])
    out["feedback_at"] = _utc(out["feedback_at"])
    out["day"] = _utc_day(out["created_at"])
    for col in ("rating", "first_token_s", "passages", "best_evidence"):
        out[col] = pd.to_numeric(out[col], errors="coerce")
    out = out.sort_values(["created_at", "message_id"], kind="stable").reset_index(drop=True)
    out["question"] = _questions(out)
    return out[MESSAGE_COLUMNS + ["question"]]


def _questions(msgs: pd.DataFrame) -> pd.Series:
    """For each message, the text of the last user message before it in its conversation
    (what an answer answered); unrecorded questions show NOT_RECORDED."""
    ordered = msgs.sort_values(["conversation_id", "message_id"], kind="stable")
    asked = ordered["text"].where(ordered["role"] == "user")
    asked = asked.groupby(ordered["conversation_id"]).ffill()
    return asked.reindex(msgs.index).fillna("").astype(object)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


# -- figures ------------------------------------------------------------------------


def day_range(since: date, until: date) -> pd.DatetimeIndex:
    """Every UTC day from ``since`` to ``until``, both included."""
    return pd.date_range(pd.Timestamp(since), pd.Timestamp(until), freq="D", name="day")


def per_day(conversations: pd.DataFrame, messages: pd.DataFrame, since: date, until: date) -> pd.DataFrame:
    """Columns day, conversations, messages, people; one row per day of [since, until], 0 where nothing happened.

    conversations: started that day (their first message); messages: every stored turn
    (questions and answers); people: distinct persons who sent or received a message that day."""
    days = day_range(since, until)
    conv = conversations.groupby("day")["conversation_id"].nunique() if len(conversations) else pd.Series(dtype=int)
    msg = messages.groupby("day")["message_id"].count() if len(messages) else pd.Series(dtype=int)
    ppl = messages.groupby("day")["person_id"].nunique() if len(messages) else pd.Series(dtype=int)
    out = pd.DataFrame({
        "day": days,
        "conversations": conv.reindex(days, fill_value=0).to_numpy(dtype="int64"),
        "messages": msg.reindex(days, fill_value=0).to_numpy(dtype="int64"),
        "people": ppl.reindex(days, fill_value=0).to_numpy(dtype="int64"),
    })
    return out


def _answers(messages: pd.DataFrame) -> pd.DataFrame:
    return messages[messages["role"] == "assistant"] if len(messages) else messages


def first_token_per_day(messages: pd.DataFrame) -> pd.DataFrame:
    """Columns day, answers, median_s, p90_s: seconds from the question to the answer's first
    piece (``meta.first_token_s``), per UTC day with at least one timed answer. p90 is the
    linearly interpolated 90th percentile (pandas ``quantile(0.9)``)."""
    answers = _answers(messages)
    timed = answers[answers["first_token_s"].notna()] if len(answers) else answers
    if not len(timed):
        return pd.DataFrame({"day": pd.Series(dtype="datetime64[ns]"), "answers": pd.Series(dtype="int64"),
                             "median_s": pd.Series(dtype=float), "p90_s": pd.Series(dtype=float)})
    g = timed.groupby("day")["first_token_s"]
    out = pd.DataFrame({"answers": g.count(), "median_s": g.median(), "p90_s": g.quantile(0.9)}).reset_index()
    out["answers"] = out["answers"].astype("int64")
    return out


def busiest(conversations: pd.DataFrame, messages: pd.DataFrame, source: str) -> pd.DataFrame:
    """Columns where, conversations, messages, people for one ``source`` ("share": links by
    label, "embed": sites, "api": keys by name), busiest (most conversations, then messages) first."""
    conv = conversations[conversations["source"] == source] if len(conversations) else conversations
    msgs = messages[messages["source"] == source] if len(messages) else messages
    cols = ["where", "conversations", "messages", "people"]
    if not len(conv) and not len(msgs):
        return pd.DataFrame({c: pd.Series(dtype=object if c == "where" else "int64") for c in cols})
    c = conv.groupby("where")["conversation_id"].nunique() if len(conv) else pd.Series(dtype="int64")
    m = msgs.groupby("where")["message_id"].count() if len(msgs) else pd.Series(dtype="int64")
    p = msgs.groupby("where")["person_id"].nunique() if len(msgs) else pd.Series(dtype="int64")
    names = sorted(set(c.index) | set(m.index))
    out = pd.DataFrame({
        "where": names,
        "conversations": c.reindex(names, fill_value=0).to_numpy(dtype="int64"),
        "messages": m.reindex(names, fill_value=0).to_numpy(dtype="int64"),
        "people": p.reindex(names, fill_value=0).to_numpy(dtype="int64"),
    })
    return out.sort_values(["conversations", "messages", "where"], ascending=[False, False, True],
                           kind="stable").reset_index(drop=True)


def negative_feedback(messages: pd.DataFrame) -> pd.DataFrame:
    """Answers rated thumbs down, newest rating first: when (rated), gpt, question, answer,
    comment, where, person, conversation_id."""
    cols = ["when", "gpt", "question", "answer", "comment", "where", "person", "conversation_id", "message_id"]
    answers = _answers(messages)
    bad = answers[answers["rating"] == -1] if len(answers) else answers
    if not len(bad):
        return _empty(cols)
    out = pd.DataFrame({
        "when": bad["feedback_at"].fillna(bad["created_at"]),
        "gpt": bad["gpt"], "question": bad["question"], "answer": bad["text"], "comment": bad["comment"],
        "where": bad["where"], "person": bad["person"], "conversation_id": bad["conversation_id"],
        "message_id": bad["message_id"],
    })
    return out.sort_values(["when", "message_id"], ascending=False, kind="stable").reset_index(drop=True)


def unanswered_mask(messages: pd.DataFrame, threshold: float = LOW_EVIDENCE) -> pd.Series:
    """True for answers the knowledge could not support: retrieval found no passage, or its
    best evidence sentence scored below ``threshold``, or a knowledge-only GPT refused."""
    if not len(messages):
        return pd.Series(dtype=bool)
    is_answer = messages["role"] == "assistant"
    no_passage = messages["passages"].notna() & (messages["passages"] == 0)
    weak = messages["best_evidence"].notna() & (messages["best_evidence"] < threshold)
    refused = messages["grounding_action"] == "refuse"
    return is_answer & (no_passage | weak | refused)


def _why(row) -> str:
    if row["passages"] == 0:
        return "No passage found"
    if row["grounding_action"] == "refuse" and row["grounding_reason"]:
        return f"Refused: {row['grounding_reason']}"
    if row["grounding_action"] == "refuse":
        return "Refused"
    return f"Weak match (best evidence {row['best_evidence']:.2f})"


def unanswered(messages: pd.DataFrame, threshold: float = LOW_EVIDENCE) -> pd.DataFrame:
    """Questions the knowledge could not answer (see ``unanswered_mask``), newest first: when,
    gpt, question, answer, why, passages, best_evidence, where, person, conversation_id."""
    cols = ["when", "gpt", "question", "answer", "why", "passages", "best_evidence", "where", "person",
            "conversation_id", "message_id"]
    if not len(messages):
        return _empty(cols)
    rows = messages[unanswered_mask(messages, threshold)]
    if not len(rows):
        return _empty(cols)
    out = pd.DataFrame({
        "when": rows["created_at"], "gpt": rows["gpt"], "question": rows["question"], "answer": rows["text"],
        "why": rows.apply(_why, axis=1) if len(rows) else [], "passages": rows["passages"],
        "best_evidence": rows["best_evidence"], "where": rows["where"], "person": rows["person"],
        "conversation_id": rows["conversation_id"], "message_id": rows["message_id"],
    })
    return out.sort_values(["when", "message_id"], ascending=False, kind="stable").reset_index(drop=True)


def totals(conversations: pd.DataFrame, messages: pd.DataFrame, threshold: float = LOW_EVIDENCE) -> dict[str, Any]:
    """The tiles: conversations, messages, people, thumbs_up, thumbs_down, answers,
    unanswered, median_first_token_s and p90_first_token_s (None without timed answers)."""
    answers = _answers(messages)
    ttft = answers["first_token_s"].dropna() if len(answers) else pd.Series(dtype=float)
    return {
        "conversations": int(conversations["conversation_id"].nunique()) if len(conversations) else 0,
        "messages": int(len(messages)),
        "people": int(messages["person_id"].nunique()) if len(messages) else 0,
        "thumbs_up": int((answers["rating"] == 1).sum()) if len(answers) else 0,
        "thumbs_down": int((answers["rating"] == -1).sum()) if len(answers) else 0,
        "answers": int(len(answers)),
        "unanswered": int(unanswered_mask(messages, threshold).sum()) if len(messages) else 0,
        "median_first_token_s": float(ttft.median()) if len(ttft) else None,
        "p90_first_token_s": float(ttft.quantile(0.9)) if len(ttft) else None,
    }


def per_gpt(conversations: pd.DataFrame, messages: pd.DataFrame, gpts: Iterable[tuple[str, str]] = (),
            threshold: float = LOW_EVIDENCE) -> pd.DataFrame:
    """One row per GPT (``gpts``: (id, name) pairs, so quiet GPTs show zeros; others seen in
    the data are added): gpt, conversations, messages, people, thumbs_up, thumbs_down,
    unanswered, median_first_token_s; busiest first."""
    names: dict[str, str] = dict(gpts)
    for frame in (conversations, messages):
        if len(frame):
            for gid, name in zip(frame["gpt_id"], frame["gpt"]):
                names.setdefault(gid, name)
    rows = []
    for gid, name in names.items():
        conv = conversations[conversations["gpt_id"] == gid] if len(conversations) else conversations
        msgs = messages[messages["gpt_id"] == gid] if len(messages) else messages
        t = totals(conv, msgs, threshold)
        rows.append({"gpt_id": gid, "gpt": name, "conversations": t["conversations"], "messages": t["messages"],
                     "people": t["people"], "thumbs_up": t["thumbs_up"], "thumbs_down": t["thumbs_down"],
                     "unanswered": t["unanswered"], "median_first_token_s": t["median_first_token_s"]})
    cols = ["gpt_id", "gpt", "conversations", "messages", "people", "thumbs_up", "thumbs_down", "unanswered",
            "median_first_token_s"]
    if not rows:
        return _empty(cols)
    out = pd.DataFrame(rows, columns=cols)
    out["median_first_token_s"] = pd.to_numeric(out["median_first_token_s"], errors="coerce")
    return out.sort_values(["conversations", "messages", "gpt"], ascending=[False, False, True],
                           kind="stable").reset_index(drop=True)


def conversations_export(messages: pd.DataFrame) -> pd.DataFrame:
    """One row per message for the CSV: conversation_id, gpt, source, where, person, role,
    text (NOT_RECORDED for unrecorded turns), when (UTC, ISO 8601), rating (1, -1 or empty)."""
    cols = ["conversation_id", "gpt", "source", "where", "person", "role", "text", "when", "rating"]
    if not len(messages):
        return _empty(cols)
    started = messages.groupby("conversation_id")["created_at"].transform("min")
    ordered = messages.assign(_started=started).sort_values(["_started", "conversation_id", "message_id"],
                                                            kind="stable")
    when = ordered["created_at"].dt.tz_convert(timezone.utc).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return pd.DataFrame({
        "conversation_id": ordered["conversation_id"], "gpt": ordered["gpt"], "source": ordered["source"],
        "where": ordered["where"], "person": ordered["person"], "role": ordered["role"], "text": ordered["text"],
        "when": when, "rating": ordered["rating"].astype("Int64"),
    }).reset_index(drop=True)


def as_day(value: date | datetime | None) -> date | None:
    """A date for the window's ends (a datetime becomes its UTC day)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).date()
    return value
