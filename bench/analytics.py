"""Benchmark: the Analytics page's figures and the export/import of a GPT bundle.

Analytics: a home seeded (bulk SQL, the real schema) with ``--conversations`` visitor
conversations of ``--turns`` question/answer pairs over 90 days, through share links,
the widget and the API, with timings, retrieval facts and feedback; then, in one
process: ``Services.analytics`` for one GPT and for all GPTs over 90 days, the
conversations CSV (neutralised), and beside them a plain pandas baseline (``read_sql``
of the joined messages + the per-day groupby only). Bundles: a GPT with
``--knowledge-mb`` of text knowledge exported and imported (parsed and re-indexed on
import is left to the background job; only the bundle steps are timed), beside plain
``zipfile`` writing and reading the same files. Peak Python memory by tracemalloc.

    .venv/bin/python bench/analytics.py [--conversations 5000] [--turns 3] [--knowledge-mb 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sqlalchemy as sa  # noqa: E402

from personal_gpt.auth import Principal  # noqa: E402
from personal_gpt.config import Settings  # noqa: E402
from personal_gpt.services import Services  # noqa: E402
from personal_gpt.store import schema as t  # noqa: E402

ME = Principal.local()


def timed(fn, memory: bool = True):
    """(result, seconds, peak MB): timed without tracing (tracemalloc slows Python code
    2-3x), then run once more under tracemalloc for the peak of Python allocations."""
    t0 = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t0
    if not memory:
        return out, took, float("nan")
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, took, peak


def seed(svc: Services, n_conv: int, turns: int) -> tuple[str, int]:
    rng = random.Random(0)
    gpt = svc.create_gpt(ME, name="Bench helper")
    svc.publish(ME, gpt.id)
    other = svc.create_gpt(ME, name="Second helper")
    links = [svc.create_share_link(ME, gpt.id, public=True, label=f"Link {i}")[0].id for i in range(5)]
    svc.save_embed_settings(ME, gpt.id, sites=["https://www.bloom.example", "https://shop.bloom.example"])
    keys = [svc.create_api_key(ME, gpt.id, name=f"Key {i}")[0].id for i in range(2)]
    now = datetime.now(timezone.utc)
    n_messages = 0
    with svc.store.tx() as conn:
        visitors = []
        for i in range(max(1, n_conv // 3)):
            visitors.append(conn.execute(sa.insert(t.users).values(
                issuer="visitor", subject=f"v{i:08d}", created_at=now)).inserted_primary_key[0])
        conv_rows, msg_rows = [], []
        for c in range(n_conv):
            start = now - timedelta(days=rng.uniform(0, 89), minutes=rng.uniform(0, 600))
            source = rng.choice(["share", "share", "embed", "api", "preview"])
            conv_id = f"conv_{c:016x}"
            conv_rows.append(dict(
                id=conv_id, gpt_id=gpt.id if c % 10 else other.id, user_id=rng.choice(visitors), source=source,
                version_number=1, title=f"Question {c}", created_at=start, updated_at=start,
                share_link_id=rng.choice(links) if source == "share" else None,
                site="https://www.bloom.example" if source == "embed" else None,
                api_key_id=rng.choice(keys) if source == "api" else None,
            ))
            for k in range(turns):
                at = start + timedelta(seconds=30 * k)
                msg_rows.append(dict(conversation_id=conv_id, role="user", content=f"=cmd question {c}-{k} about roses",
                                     meta={}, created_at=at))
                msg_rows.append(dict(conversation_id=conv_id, role="assistant", content=f"Answer {c}-{k}: water weekly.",
                                     meta={"model": "bench", "first_token_s": rng.uniform(0.05, 2.0),
                                           "total_s": rng.uniform(0.5, 6.0), "finish_reason": "stop",
                                           "retrieval": {"passages": rng.choice([0, 2, 4]),
                                                         "best_evidence": rng.uniform(0, 1)}},
                                     created_at=at + timedelta(seconds=2)))
        conn.execute(sa.insert(t.conversations), conv_rows)
        for i in range(0, len(msg_rows), 5000):
            conn.execute(sa.insert(t.messages), msg_rows[i:i + 5000])
        n_messages = len(msg_rows)
        answers = conn.execute(sa.select(t.messages.c.id, t.conversations.c.gpt_id)
                               .join(t.conversations, t.conversations.c.id == t.messages.c.conversation_id)
                               .where(t.messages.c.role == "assistant")).all()
        fb = [dict(gpt_id=g, message_id=m, rating=rng.choice([1, 1, -1]), comment="meh", created_at=now, updated_at=now)
              for m, g in answers if rng.random() < 0.15]
        if fb:
            conn.execute(sa.insert(t.feedback), fb)
    return gpt.id, n_messages


def baseline(svc: Services, gpt_id: str, since: datetime):
    """Plain pandas: the joined messages of the window, and the per-day counts only."""
    import pandas as pd

    q = (sa.select(t.messages.c.created_at, t.messages.c.conversation_id, t.conversations.c.user_id)
         .join(t.conversations, t.conversations.c.id == t.messages.c.conversation_id)
         .where(t.conversations.c.gpt_id == gpt_id, t.messages.c.created_at >= since))
    with svc.store.engine.connect() as conn:
        df = pd.read_sql(q, conn)
    df["day"] = pd.to_datetime(df["created_at"], utc=True).dt.date
    return df.groupby("day").agg(messages=("conversation_id", "size"), conversations=("conversation_id", "nunique"),
                                 people=("user_id", "nunique"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=5000)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--knowledge-mb", type=float, default=20.0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="pgpt-bench-analytics-") as tmp:
        os.environ["PERSONAL_GPT_HOME"] = str(Path(tmp) / "home")
        os.environ["PGPT_FINETUNE_LOCAL_WORKER"] = "0"
        svc = Services(Settings.from_env())
        (gpt_id, n_messages), took, _ = timed(lambda: seed(svc, args.conversations, args.turns), memory=False)
        print(f"seeded {args.conversations:,} conversations, {n_messages:,} messages in {took:.1f} s")
        today = datetime.now(timezone.utc).date()
        since = today - timedelta(days=89)
        since_dt = datetime.combine(since, datetime.min.time(), tzinfo=timezone.utc)

        import pandas  # noqa: F401  (imports and a first query warm both sides before timing)

        import personal_gpt.analytics  # noqa: F401

        baseline(svc, gpt_id, since_dt)
        base, b_s, b_mb = timed(lambda: baseline(svc, gpt_id, since_dt))
        one, o_s, o_mb = timed(lambda: svc.analytics(ME, gpt_id, since, today))
        every, a_s, a_mb = timed(lambda: svc.analytics(ME, None, since, today))
        from personal_gpt.csv_safe import to_csv_bytes

        csv, c_s, c_mb = timed(lambda: to_csv_bytes(svc.conversations_table(ME, gpt_id, since, today)))
        assert int(base["messages"].sum()) == int(one.totals["messages"]), (base["messages"].sum(), one.totals)
        print(f"\n{'analytics (90 days)':44s} {'seconds':>8s} {'peak MB':>8s}")
        print(f"{'plain pandas: read_sql + per-day groupby':44s} {b_s:8.2f} {b_mb:8.1f}")
        print(f"{'ours: one GPT, every figure':44s} {o_s:8.2f} {o_mb:8.1f}")
        print(f"{'ours: all GPTs, every figure + per GPT':44s} {a_s:8.2f} {a_mb:8.1f}")
        print(f"{'ours: conversations CSV (' + format(len(csv) / 2**20, '.1f') + ' MB)':44s} {c_s:8.2f} {c_mb:8.1f}")
        print(f"ratio ours/baseline (one GPT): {o_s / b_s:.1f}x time for {len(json.dumps(one.totals))} totals, "
              f"{len(one.per_day)} days, {len(one.unanswered)} unanswered, {len(one.negative_feedback)} 👎 rows")

        # bundles: a GPT with text knowledge files, exported and imported
        g = svc.create_gpt(ME, name="Bundle bench")
        rng = random.Random(1)
        words = ["rose", "tulip", "water", "soil", "prune", "sun", "shade", "compost", "bloom", "seed"]
        files, size = [], 0
        target = int(args.knowledge_mb * 2**20)
        i = 0
        while size < target:
            text = " ".join(rng.choice(words) for _ in range(200_000)).encode()
            files.append((f"notes-{i}.txt", text))
            size += len(text)
            i += 1
        svc.add_knowledge(ME, g.id, files, run_jobs=False)
        out = Path(tmp) / "bench.zip"
        _, e_s, e_mb = timed(lambda: svc.export_gpt(ME, g.id, out))
        imported, i_s, i_mb = timed(lambda: svc.import_gpt(ME, out, run_jobs=False))

        def plain_zip():
            p = Path(tmp) / "plain.zip"
            with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in files:
                    zf.writestr(name, data)
            with zipfile.ZipFile(p) as zf:
                for info in zf.infolist():
                    zf.read(info)
            return p

        _, z_s, z_mb = timed(plain_zip)
        print(f"\n{'bundle of ' + format(size / 2**20, '.1f') + ' MB knowledge (' + str(len(files)) + ' files)':44s} "
              f"{'seconds':>8s} {'peak MB':>8s}")
        print(f"{'plain zipfile: write + read back':44s} {z_s:8.2f} {z_mb:8.1f}")
        print(f"{'ours: export (' + format(out.stat().st_size / 2**20, '.1f') + ' MB file)':44s} {e_s:8.2f} {e_mb:8.1f}")
        print(f"{'ours: import (validate, new GPT, files)':44s} {i_s:8.2f} {i_mb:8.1f}")
        print(f"ratio ours/baseline: export+import {(e_s + i_s) / z_s:.1f}x; imported as {imported.name!r}")
        svc.close()


if __name__ == "__main__":
    main()
