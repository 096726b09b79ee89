"""The services facade on the real database (SQLite file and PostgreSQL), with
the echo stand-in at the ChatModel seam (the real model has its own tests)."""

from __future__ import annotations

import inspect
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from personal_gpt.auth import Principal
from personal_gpt.config import Settings
from personal_gpt.errors import Conflict, InvalidInput, NotFound, StoreError
from personal_gpt.services import Services
from tests.support.fake_model import EchoModel, FakeRegistry
from tests.support.pg import settings_on

ALICE = Principal(issuer="https://idp.example", subject="alice", email="alice@example.com", email_verified=True)
BOB = Principal(issuer="https://idp.example", subject="bob", email="bob@example.com", email_verified=True)


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, home: Path) -> Settings:
    yield from settings_on(request)  # PostgreSQL: one fresh database per test keeps tests independent


@pytest.fixture
def svc(settings):
    s = Services(settings, models=FakeRegistry())
    yield s
    s.close()


def blank_gpt(svc, p=ALICE, name="Helper"):
    return svc.create_gpt(p, name=name)


def test_create_from_template_fills_blanks(svc):
    tpl = svc.templates()[0]
    blanks = {b.key: (b.example or "Acme") for b in tpl.blanks}
    gpt = svc.create_gpt(ALICE, template_id=tpl.id, name="Acme helper", blanks=blanks)
    assert gpt.name == "Acme helper"
    assert gpt.latest_version == 1 and gpt.published_version is None
    assert gpt.spec.template_id == tpl.id
    assert "{" not in gpt.spec.instructions.replace("{{", "")
    assert [g.id for g in svc.list_gpts(ALICE)] == [gpt.id]


def test_template_with_missing_blanks_is_refused_and_nothing_saved(svc):
    tpl = next(t for t in svc.templates() if any(b.required for b in t.blanks))
    with pytest.raises(InvalidInput, match="Fill in"):
        svc.create_gpt(ALICE, template_id=tpl.id, blanks={})
    assert svc.list_gpts(ALICE) == []


def test_unknown_template(svc):
    with pytest.raises(NotFound, match="There is no template called 'nope'"):
        svc.create_gpt(ALICE, template_id="nope")


@pytest.mark.parametrize(
    "name, message",
    [("", "Give your GPT a name."), ("   ", "Give your GPT a name."), ("x" * 81, "The name is too long")],
)
def test_bad_names(svc, name, message):
    with pytest.raises(InvalidInput, match=message):
        svc.create_gpt(ALICE, name=name)
    assert svc.list_gpts(ALICE) == []


def test_duplicate_name_is_refused_but_other_creators_may_use_it(svc):
    blank_gpt(svc, name="Coach")
    with pytest.raises(InvalidInput, match="You already have a GPT called 'coach'"):
        blank_gpt(svc, name="coach")
    assert blank_gpt(svc, BOB, name="Coach").name == "Coach"


def test_instructions_longer_than_the_context_window(svc):
    gpt = blank_gpt(svc)
    spec = gpt.spec.model_copy(update={"instructions": "word " * 40_000})
    with pytest.raises(InvalidInput, match="context window: shorten them"):
        svc.save_draft(ALICE, gpt.id, spec, gpt.revision)
    assert svc.get_gpt(ALICE, gpt.id).latest_version == 1


def test_versions_publish_restore(svc):
    gpt = blank_gpt(svc)
    v2 = svc.save_draft(ALICE, gpt.id, gpt.spec.model_copy(update={"instructions": "Be brief."}), gpt.revision)
    assert v2.latest_version == 2
    same = svc.save_draft(ALICE, gpt.id, v2.spec, v2.revision)
    assert same.latest_version == 2, "saving unchanged values makes no new version"
    pub = svc.publish(ALICE, gpt.id)
    assert pub.published_version == 2
    v3 = svc.save_draft(ALICE, gpt.id, v2.spec.model_copy(update={"instructions": "Be long."}), v2.revision)
    assert svc.published_spec(ALICE, gpt.id)[0].instructions == "Be brief."
    restored = svc.restore_version(ALICE, gpt.id, 1)
    assert restored.latest_version == 4 and restored.spec.instructions == gpt.spec.instructions
    notes = [v.note for v in svc.versions(ALICE, gpt.id)]
    assert notes[0] == "Restored version 1" and len(notes) == 4
    assert v3.latest_version == 3
    with pytest.raises(NotFound, match="no version 9"):
        svc.publish(ALICE, gpt.id, 9)


def test_stale_edit_raises_conflict(svc):
    gpt = blank_gpt(svc)
    svc.save_draft(ALICE, gpt.id, gpt.spec.model_copy(update={"description": "tab one"}), gpt.revision)
    with pytest.raises(Conflict, match="changed somewhere else"):
        svc.save_draft(ALICE, gpt.id, gpt.spec.model_copy(update={"description": "tab two"}), gpt.revision)
    assert svc.get_gpt(ALICE, gpt.id).spec.description == "tab one"


def test_duplicate_and_delete(svc):
    gpt = blank_gpt(svc)
    copy = svc.duplicate(ALICE, gpt.id)
    copy2 = svc.duplicate(ALICE, gpt.id)
    assert (copy.name, copy2.name) == ("Helper (copy)", "Helper (copy 2)")
    conv = svc.start_conversation(ALICE, gpt.id, source="preview")
    svc.send(ALICE, conv, "hello", spec=gpt.spec).pieces.close()
    svc.delete_gpt(ALICE, gpt.id)
    with pytest.raises(NotFound):
        svc.get_gpt(ALICE, gpt.id)
    with pytest.raises(NotFound):
        svc.messages(ALICE, conv)
    with svc.store.read() as conn:
        for table in ("gpt_versions", "conversations"):
            n = conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE gpt_id = :g"), {"g": gpt.id}).scalar()
            assert n == 0
        assert conn.execute(sa.text("SELECT count(*) FROM messages")).scalar() == 0


def test_chat_saves_both_turns_and_passes_history(svc):
    gpt = blank_gpt(svc)
    svc.publish(ALICE, gpt.id)
    conv = svc.start_conversation(ALICE, gpt.id)
    reply = svc.send(ALICE, conv, "first question")
    assert "".join(reply.pieces) == "You said: first question"
    reply = svc.send(ALICE, conv, "second")
    list(reply.pieces)
    msgs = svc.messages(ALICE, conv)
    assert [(m.role, m.content) for m in msgs] == [
        ("user", "first question"), ("assistant", "You said: first question"),
        ("user", "second"), ("assistant", "You said: second"),
    ]
    assert msgs[-1].meta["finish_reason"] == "stop" and msgs[-1].meta["model"] == "echo (test stand-in)"
    prompt = svc.models.model.calls[-1]
    assert prompt[0]["role"] == "system" and prompt[0]["content"] == gpt.spec.instructions
    assert [m["content"] for m in prompt[1:]] == ["first question", "You said: first question", "second"]
    conv_row = svc.list_conversations(ALICE, gpt.id)[0]
    assert conv_row.title == "first question" and conv_row.version_number == 1


def test_chat_needs_a_published_version(svc):
    gpt = blank_gpt(svc)
    conv = svc.start_conversation(ALICE, gpt.id)
    with pytest.raises(InvalidInput, match="is not published yet"):
        svc.send(ALICE, conv, "hi")
    assert svc.messages(ALICE, conv) == []


@pytest.mark.parametrize("message, error", [("", "Type a message first."), ("x" * 8001, "That message is too long")])
def test_bad_messages_save_nothing(svc, message, error):
    gpt = blank_gpt(svc)
    conv = svc.start_conversation(ALICE, gpt.id, source="preview")
    with pytest.raises(InvalidInput, match=error):
        svc.send(ALICE, conv, message, spec=gpt.spec)
    assert svc.messages(ALICE, conv) == []


def test_stopping_a_stream_keeps_the_partial_answer(svc):
    gpt = blank_gpt(svc)
    conv = svc.start_conversation(ALICE, gpt.id, source="preview")
    reply = svc.send(ALICE, conv, "one two three four five", spec=gpt.spec)
    first = next(reply.pieces)
    reply.pieces.close()  # what Streamlit's stop does to the generator
    msgs = svc.messages(ALICE, conv)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].content == first and msgs[1].meta["finish_reason"] == "cancelled"


def test_regenerate_replaces_the_last_answer(svc):
    gpt = blank_gpt(svc)
    conv = svc.start_conversation(ALICE, gpt.id, source="preview")
    list(svc.send(ALICE, conv, "hello", spec=gpt.spec).pieces)
    list(svc.regenerate(ALICE, conv, spec=gpt.spec).pieces)
    assert [m.role for m in svc.messages(ALICE, conv)] == ["user", "assistant"]


def test_long_history_is_trimmed_to_the_window(settings):
    small = EchoModel(context_window=120)
    svc = Services(settings, models=FakeRegistry(small))
    gpt = svc.create_gpt(ALICE, name="Tiny", spec=None)
    spec = gpt.spec.model_copy(update={"generation": gpt.spec.generation.model_copy(update={"max_new_tokens": 20})})
    conv = svc.start_conversation(ALICE, gpt.id, source="preview")
    for i in range(12):
        list(svc.send(ALICE, conv, f"message number {i} " + "pad " * 5, spec=spec).pieces)
    prompt = small.calls[-1]
    assert prompt[0]["role"] == "system" and prompt[-1]["content"].startswith("message number 11")
    assert small.count_tokens(prompt) <= 100 and len(prompt) < 24
    with pytest.raises(InvalidInput, match="shorten the instructions or the message"):
        svc.send(ALICE, conv, "long " * 200, spec=spec)
    svc.close()


# --- tenancy: creator B never reaches creator A's rows ------------------------

ID_METHODS = {
    "get_gpt": lambda s, ids: s.get_gpt(BOB, ids["gpt"]),
    "save_draft": lambda s, ids: s.save_draft(BOB, ids["gpt"], {"name": "Stolen"}, 1),
    "publish": lambda s, ids: s.publish(BOB, ids["gpt"]),
    "unpublish": lambda s, ids: s.unpublish(BOB, ids["gpt"]),
    "versions": lambda s, ids: s.versions(BOB, ids["gpt"]),
    "version_spec": lambda s, ids: s.version_spec(BOB, ids["gpt"], 1),
    "published_spec": lambda s, ids: s.published_spec(BOB, ids["gpt"]),
    "restore_version": lambda s, ids: s.restore_version(BOB, ids["gpt"], 1),
    "duplicate": lambda s, ids: s.duplicate(BOB, ids["gpt"]),
    "delete_gpt": lambda s, ids: s.delete_gpt(BOB, ids["gpt"]),
    "start_conversation": lambda s, ids: s.start_conversation(BOB, ids["gpt"]),
    "list_conversations": lambda s, ids: s.list_conversations(BOB, ids["gpt"]),
    "messages": lambda s, ids: s.messages(BOB, ids["conv"]),
    "send": lambda s, ids: s.send(BOB, ids["conv"], "hi"),
    "regenerate": lambda s, ids: s.regenerate(BOB, ids["conv"]),
    "delete_provider": lambda s, ids: s.delete_provider(BOB, ids["provider"]),
    "test_provider": lambda s, ids: s.test_provider(BOB, ids["provider"]),
    "add_knowledge": lambda s, ids: s.add_knowledge(BOB, ids["gpt"], [("x.txt", b"stolen")]),
    "list_knowledge": lambda s, ids: s.list_knowledge(BOB, ids["gpt"]),
    "remove_knowledge": lambda s, ids: s.remove_knowledge(BOB, ids["gpt"], "kf_0000000000000000"),
    "knowledge_jobs": lambda s, ids: s.knowledge_jobs(BOB, ids["gpt"]),
    "search_knowledge": lambda s, ids: s.search_knowledge(BOB, ids["gpt"], "plans"),
    "create_share_link": lambda s, ids: s.create_share_link(BOB, ids["gpt"], public=True),
    "list_share_links": lambda s, ids: s.list_share_links(BOB, ids["gpt"]),
    "revoke_share_link": lambda s, ids: s.revoke_share_link(BOB, _alice_link(s, ids)),
    "rotate_share_link": lambda s, ids: s.rotate_share_link(BOB, _alice_link(s, ids)),
    # a visitor (B signed in) reaches neither A's dead link nor A's conversations through A's live link
    "shared_access": lambda s, ids: s.shared_access(_alice_link(s, ids, revoked=True), _bob_visiting()),
    "start_shared_conversation": lambda s, ids: s.start_shared_conversation(_alice_link(s, ids, revoked=True), _bob_visiting()),
    "shared_conversations": lambda s, ids: s.shared_conversations(_alice_link(s, ids, revoked=True), _bob_visiting()),
    "shared_messages": lambda s, ids: s.shared_messages(_alice_link(s, ids), _bob_visiting(), ids["conv"]),
    "send_shared": lambda s, ids: s.send_shared(_alice_link(s, ids), _bob_visiting(), ids["conv"], "hi"),
    # fine-tuning (tests/unit/test_finetune_service.py covers real jobs and adapters of A)
    "preview_training_data": lambda s, ids: s.preview_training_data(BOB, ids["gpt"], b'{"prompt": "a", "response": "b"}', "x.jsonl"),
    "check_training_examples": lambda s, ids: s.check_training_examples(BOB, ids["gpt"], [], {}),
    "training_pairs_from_knowledge": lambda s, ids: s.training_pairs_from_knowledge(BOB, ids["gpt"]),
    "start_finetune": lambda s, ids: s.start_finetune(BOB, ids["gpt"], [], {}, start_worker=False),
    "finetune_jobs": lambda s, ids: s.finetune_jobs(BOB, ids["gpt"]),
    "finetune_job": lambda s, ids: s.finetune_job(BOB, ids["gpt"], "ftj_0000000000000000"),
    "find_finetune_job": lambda s, ids: s.find_finetune_job(BOB, "ftj_0000000000000000"),
    "cancel_finetune": lambda s, ids: s.cancel_finetune(BOB, ids["gpt"], "ftj_0000000000000000"),
    "list_adapters": lambda s, ids: s.list_adapters(BOB, ids["gpt"]),
    "get_adapter": lambda s, ids: s.get_adapter(BOB, ids["gpt"], 1),
    "activate_adapter": lambda s, ids: s.activate_adapter(BOB, ids["gpt"], None),
    "active_adapter": lambda s, ids: s.active_adapter(BOB, ids["gpt"]),
    "delete_adapter": lambda s, ids: s.delete_adapter(BOB, ids["gpt"], 1),
    "export_adapter": lambda s, ids: s.export_adapter(BOB, ids["gpt"], 1, "/tmp/never-written"),
    # bundles and save as template (tests/unit/test_bundle.py covers A's own)
    "export_gpt": lambda s, ids: s.export_gpt(BOB, ids["gpt"], Path("/tmp/never-written.zip")),
    "save_as_template": lambda s, ids: s.save_as_template(BOB, ids["gpt"], key="stolen-template"),
    # embed widget (creator side scoped to the owner; visitor side: A's embed is off or the conversation is A's)
    "embed_settings": lambda s, ids: s.embed_settings(BOB, ids["gpt"]),
    "save_embed_settings": lambda s, ids: s.save_embed_settings(BOB, ids["gpt"], sites=["https://evil.example"]),
    "check_embed_site": lambda s, ids: s.check_embed_site(BOB, ids["gpt"], "https://evil.example"),
    "embed_conversations": lambda s, ids: s.embed_conversations(BOB, ids["gpt"]),
    "embed_conversation_messages": lambda s, ids: s.embed_conversation_messages(BOB, ids["gpt"], ids["conv"]),
    "embed_page": lambda s, ids: s.embed_page(ids["gpt"]),  # A never turned the embed on
    "embed_access": lambda s, ids: s.embed_access(ids["gpt"], _bob_visiting()),
    "start_embed_conversation": lambda s, ids: s.start_embed_conversation(
        ids["gpt"], _bob_visiting(), "https://alice.example"),
    "embed_visitor_conversations": lambda s, ids: s.embed_visitor_conversations(ids["gpt"], _bob_visiting()),
    "embed_visitor_messages": lambda s, ids: s.embed_visitor_messages(_alice_embed(s, ids), _bob_visiting(), ids["conv"]),
    "send_embed": lambda s, ids: s.send_embed(_alice_embed(s, ids), _bob_visiting(), ids["conv"], "hi"),
    # HTTP API keys
    "create_api_key": lambda s, ids: s.create_api_key(BOB, ids["gpt"]),
    "list_api_keys": lambda s, ids: s.list_api_keys(BOB, ids["gpt"]),
    "revoke_api_key": lambda s, ids: s.revoke_api_key(BOB, _alice_key(s, ids)),
    "api_conversations": lambda s, ids: s.api_conversations(BOB, ids["gpt"]),
    "api_conversation_messages": lambda s, ids: s.api_conversation_messages(BOB, ids["gpt"], _alice_api_call(s, ids)),
    # privacy (tests/unit/test_privacy.py and test_delete_everything.py cover A's own)
    "privacy_settings": lambda s, ids: s.privacy_settings(BOB, ids["gpt"]),
    "save_privacy_settings": lambda s, ids: s.save_privacy_settings(BOB, ids["gpt"], record=False),
    "delete_old_conversations": lambda s, ids: s.delete_old_conversations(BOB, ids["gpt"], 1),
    # analytics (tests/unit/test_analytics.py covers figures and owner scoping)
    "analytics": lambda s, ids: s.analytics(BOB, ids["gpt"]),
    "conversations_table": lambda s, ids: s.conversations_table(BOB, ids["gpt"]),
    # conversations page, feedback, corrected answers (tests/unit/test_conversations.py covers the rest)
    "creator_conversations": lambda s, ids: s.creator_conversations(BOB, ids["gpt"]),
    "conversation_filters": lambda s, ids: s.conversation_filters(BOB, ids["gpt"]),
    "creator_conversation": lambda s, ids: s.creator_conversation(BOB, ids["conv"]),
    "rate_answer": lambda s, ids: s.rate_answer(BOB, ids["conv"], _alice_answer(s, ids), 1),
    "answer_feedback": lambda s, ids: s.answer_feedback(BOB, ids["conv"]),
    "rate_shared_answer": lambda s, ids: s.rate_shared_answer(_alice_link(s, ids), _bob_visiting(), ids["conv"],
                                                              _alice_answer(s, ids), 1),
    "shared_answer_feedback": lambda s, ids: s.shared_answer_feedback(_alice_link(s, ids), _bob_visiting(), ids["conv"]),
    "rate_embed_answer": lambda s, ids: s.rate_embed_answer(_alice_embed(s, ids), _bob_visiting(), ids["conv"],
                                                            _alice_answer(s, ids), 1),
    "embed_answer_feedback": lambda s, ids: s.embed_answer_feedback(_alice_embed(s, ids), _bob_visiting(), ids["conv"]),
    "fix_answer": lambda s, ids: s.fix_answer(BOB, _alice_answer(s, ids), "stolen", "finetune"),
    "list_corrections": lambda s, ids: s.list_corrections(BOB, ids["gpt"]),
    "training_sets": lambda s, ids: s.training_sets(BOB, ids["gpt"]),
    "load_training_set": lambda s, ids: s.load_training_set(BOB, ids["gpt"], "imported-1"),
    "delete_correction": lambda s, ids: s.delete_correction(
        BOB, s.fix_answer(ALICE, _alice_answer(s, ids), "right", "finetune").id),
}


def _alice_answer(s, ids):
    return s.messages(ALICE, ids["conv"])[-1].id


def _alice_key(s, ids):
    return s.create_api_key(ALICE, ids["gpt"])[0].id


def _alice_api_call(s, ids):
    _, key = s.create_api_key(ALICE, ids["gpt"])
    turn = s.api_chat(key, ids["gpt"], [{"role": "user", "content": "secret plans"}])
    list(turn.reply.pieces)
    return turn.conversation_id


def _alice_embed(s, ids):
    """A's GPT with its embed on (so only the conversation's owner can stop B)."""
    s.save_embed_settings(ALICE, ids["gpt"], sites=["https://alice.example"])
    return ids["gpt"]


def _alice_link(s, ids, revoked=False):
    link, _ = s.create_share_link(ALICE, ids["gpt"], public=True)
    return s.revoke_share_link(ALICE, link.id).id if revoked else link.id


def _bob_visiting():
    from datetime import datetime, timezone

    from personal_gpt.sharing import Visitor

    return Visitor(principal=BOB, signed_in_at=datetime.now(timezone.utc))


# Id-taking methods that reach no one's data, each with the reason (kept short on purpose).
NOT_SCOPED = {
    # a browser's link cookie against the link's current token: answers True/False, returns nothing of the link
    "share_link_current",
}


def test_every_id_taking_method_is_covered():
    """A new service method that takes an id must be added to ID_METHODS."""
    from personal_gpt.services import Services

    ids = ("gpt_id", "conv_id", "provider_id", "link_id", "job_id", "key_id", "message_id", "correction_id")
    takes_id = {
        name for name, fn in inspect.getmembers(Services, inspect.isfunction)
        if not name.startswith("_") and any(p in inspect.signature(fn).parameters for p in ids)
    }
    assert takes_id - NOT_SCOPED == set(ID_METHODS)


def test_share_link_current_admits_nothing_without_the_token_fingerprint(svc):
    gpt = blank_gpt(svc)
    link, token = svc.create_share_link(ALICE, gpt.id, public=True)
    from personal_gpt.sharing import hash_token

    assert svc.share_link_current(link.id, hash_token(token)[:16])
    assert not svc.share_link_current(link.id, "0" * 16)
    assert not svc.share_link_current(link.id, hash_token(token))


@pytest.mark.parametrize("method", sorted(ID_METHODS))
def test_creator_b_cannot_reach_creator_a(svc, method):
    gpt = blank_gpt(svc)
    svc.publish(ALICE, gpt.id)
    conv = svc.start_conversation(ALICE, gpt.id)
    list(svc.send(ALICE, conv, "secret plans").pieces)
    prov = svc.add_provider(ALICE, name="Mine", base_url="http://127.0.0.1:9/v1", model="m", api_key="sk-alice")
    ids = {"gpt": gpt.id, "conv": conv, "provider": prov.id}
    with pytest.raises(NotFound):
        ID_METHODS[method](svc, ids)
    # A's data is intact
    assert svc.get_gpt(ALICE, gpt.id).name == "Helper"
    assert len(svc.messages(ALICE, conv)) == 2
    assert [p.id for p in svc.list_providers(ALICE)] == [prov.id]
    assert svc.list_gpts(BOB) == [] or all(g.id != gpt.id for g in svc.list_gpts(BOB))


@pytest.mark.parametrize("bad", ["../x", "gpt_1' OR '1'='1", "x" * 10_000, "", "gpt_../../etc", "gpt_ZZZZZZZZZZZZ"])
def test_malformed_ids_are_not_found(svc, bad):
    with pytest.raises(NotFound):
        svc.get_gpt(ALICE, bad)
    with pytest.raises(NotFound):
        svc.messages(ALICE, bad)


def test_same_subject_from_two_issuers_are_two_people(svc):
    a1 = Principal(issuer="https://one.example", subject="42")
    a2 = Principal(issuer="https://two.example", subject="42")
    gpt = blank_gpt(svc, a1)
    with pytest.raises(NotFound):
        svc.get_gpt(a2, gpt.id)


# --- providers ----------------------------------------------------------------


def test_provider_key_is_never_stored_in_clear(svc, settings):
    key = "sk-test-" + uuid.uuid4().hex
    prov = svc.add_provider(ALICE, name="Cloud", base_url="https://api.example.com/v1/", model="gpt-x", api_key=key)
    assert prov.base_url == "https://api.example.com/v1" and prov.has_api_key
    with svc.store.read() as conn:
        stored = conn.execute(sa.text("SELECT api_key_encrypted FROM providers")).scalar()
    assert key not in stored and stored
    if settings.database_url.startswith("sqlite"):
        svc.store.close()
        raw = b"".join(p.read_bytes() for p in settings.home.glob("personal-gpt.db*"))
        assert key.encode() not in raw
    assert svc._provider_config(svc._uid(ALICE), prov.id)["api_key"] == key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "", "base_url": "http://x/v1", "model": "m"}, "Give the provider a name"),
        ({"name": "a", "base_url": "ftp://x", "model": "m"}, "must start with http:// or https://"),
        ({"name": "a", "base_url": "http://x/v1", "model": ""}, "Say which model"),
        ({"name": "a", "base_url": "http://x/v1", "model": "m", "context_window": 10}, "between 256"),
    ],
)
def test_bad_provider_settings(svc, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        svc.add_provider(ALICE, **kwargs)
    assert svc.list_providers(ALICE) == []


# --- the database itself --------------------------------------------------------


def test_corrupt_database_file_gives_one_sentence(home):
    db = home / "personal-gpt.db"
    db.write_bytes(b"this is not sqlite" * 100)
    svc = Services(Settings.from_env(), models=FakeRegistry())
    with pytest.raises(StoreError, match="is damaged or is not a Personal GPTs database"):
        svc.list_gpts(ALICE)


def test_migrations_match_the_schema(svc):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from personal_gpt.store.schema import metadata

    with svc.store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_head_revision_constant_matches_alembic():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from personal_gpt.store.db import HEAD_REVISION, MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


def test_concurrent_editors_never_see_database_locked(svc):
    gpt = blank_gpt(svc)
    errors, conflicts, saved = [], [], []

    def editor(i):
        for j in range(5):
            try:
                current = svc.get_gpt(ALICE, gpt.id)
                spec = current.spec.model_copy(update={"description": f"edit {i}-{j}"})
                saved.append(svc.save_draft(ALICE, gpt.id, spec, current.revision).latest_version)
            except Conflict:
                conflicts.append(i)
            except Exception as exc:  # noqa: BLE001 - the test reports any other failure
                errors.append(repr(exc))

    threads = [threading.Thread(target=editor, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = svc.get_gpt(ALICE, gpt.id)
    assert final.latest_version == 1 + len(saved)
    assert len(saved) + len(conflicts) == 40
