"""Templates: every shipped template loads and renders; hostile files are reported, never fatal.

Covers SECURITY.md cases 16 (unknown keys, no code execution) and 17 (bad placeholders,
huge instructions). Hostile files are written to ``tmp_path``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from personal_gpt.errors import InvalidInput, InvalidTemplate, NotFound
from personal_gpt.gpts import GenerationSettings, GptSpec
from personal_gpt.templates import (
    MAX_TEMPLATE_INSTRUCTIONS,
    Blank,
    Template,
    TemplateCatalog,
    describe,
    load_templates,
    parse_template,
    placeholders,
    render,
)

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
SHIPPED = sorted(p.stem for p in TEMPLATES_DIR.glob("*.yaml"))


def minimal(**overrides) -> dict:
    """A valid template as a dict; tests change one thing at a time."""
    data = {
        "id": "mini",
        "name": "Mini helper",
        "description": "A tiny helper for tests.",
        "icon": "🧪",
        "category": "Business",
        "instructions": "You help customers of {business_name}. Be {tone}.",
        "blanks": [
            {"key": "business_name", "label": "Business name", "example": "Acme"},
            {"key": "tone", "label": "Tone", "example": "friendly"},
        ],
        "starters": ["What does {business_name} do?"],
        "suggested_knowledge": ["Your price list"],
        "model": {"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 128, "repetition_penalty": 1.1},
        "test_questions": ["Who are you?", "What do you sell?", "Are you open today?"],
    }
    data.update(overrides)
    return data


def write(directory: Path, stem: str, content: str | bytes) -> Path:
    path = directory / f"{stem}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def write_template(directory: Path, data: dict, stem: str | None = None) -> Path:
    return write(directory, stem or data["id"], yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


def only_problem(catalog: TemplateCatalog, stem: str) -> str:
    messages = [p.message for p in catalog.problems if p.file.stem == stem]
    assert len(messages) == 1, catalog.problems
    assert stem not in [t.id for t in catalog.templates]
    return messages[0]


@pytest.fixture(scope="module")
def shipped() -> TemplateCatalog:
    return load_templates(TEMPLATES_DIR)


# ---------------------------------------------------------------------------
# The shipped templates
# ---------------------------------------------------------------------------


def test_shipped_templates_load_without_problems(shipped):
    assert shipped.problems == []
    assert len(shipped.templates) >= 10
    assert sorted(t.id for t in shipped.templates) == SHIPPED
    orders = [(t.order, t.name.casefold()) for t in shipped.templates]
    assert orders == sorted(orders)


def test_shipped_template_ids_and_orders_are_unique(shipped):
    assert len({t.order for t in shipped.templates}) == len(shipped.templates)
    assert len({t.name for t in shipped.templates}) == len(shipped.templates)


@pytest.mark.parametrize("template_id", SHIPPED)
def test_shipped_template_is_complete_and_renders_with_examples(shipped, template_id):
    template = shipped.get(template_id)
    assert len(template.test_questions) >= 3
    assert 3 <= len(template.starters) <= 4
    assert template.suggested_knowledge
    assert template.blanks
    assert len(template.instructions) <= 1200, "keep instructions short for a small model"
    assert "don't know" in template.instructions
    assert 0.2 <= template.model.temperature <= 0.8
    for blank in template.blanks:
        assert blank.example, f"{blank.key} needs an example"
        assert blank.help, f"{blank.key} needs help text"

    spec = render(template, template.example_blanks())
    assert isinstance(spec, GptSpec)
    assert spec.name == template.name
    assert spec.template_id == template.id
    assert spec.avatar == template.icon
    assert spec.description == template.description
    assert spec.generation == template.model
    assert "{" not in spec.instructions and "}" not in spec.instructions
    assert all("{" not in s for s in spec.starters)
    assert len(spec.starters) == len(template.starters)
    for blank in template.blanks:
        assert blank.example in spec.instructions + " ".join(spec.starters)


def test_sensitive_templates_carry_safety_wording(shipped):
    fitness = shipped.get("fitness-coach").instructions
    assert "not medical advice" in fitness
    assert "injury" in fitness and "emergency" in fitness
    intake = shipped.get("client-intake").instructions
    assert "legal, medical" in intake
    assert "confidential" in intake
    assert "{emergency_number}" in intake


def test_render_with_only_required_blanks_uses_defaults(shipped):
    template = shipped.get("customer-support")
    required = {b.key: b.example for b in template.blanks if b.required}
    spec = render(template, required, name="  Bloom helper ")
    assert spec.name == "Bloom helper"
    assert "Be friendly and professional." in spec.instructions
    assert spec.blanks["tone"] == "friendly and professional"


# ---------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------


def test_get_unknown_template_is_not_found(shipped):
    with pytest.raises(NotFound) as err:
        shipped.get("nope")
    assert err.value.message == "There is no template called 'nope'."
    with pytest.raises(NotFound) as err:
        shipped.get("x" * 10_000)
    assert len(err.value.message) < 120


def test_missing_directory_is_a_problem_not_a_crash(tmp_path):
    catalog = load_templates(tmp_path / "absent")
    assert catalog.templates == []
    assert [p.message for p in catalog.problems] == ["The templates folder does not exist."]


def test_order_then_name(tmp_path):
    write_template(tmp_path, minimal(id="zed", name="Zed", order=1))
    write_template(tmp_path, minimal(id="beta", name="Beta"))
    write_template(tmp_path, minimal(id="alpha", name="alpha"))
    catalog = load_templates(tmp_path)
    assert catalog.problems == []
    assert [t.id for t in catalog.templates] == ["zed", "alpha", "beta"]


# ---------------------------------------------------------------------------
# Hostile and broken files (SECURITY.md 16, 17)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"trusted": True}, "Unknown key 'trusted' (see templates/README.md for the allowed keys)."),
        ({"owner_id": "someone-else"}, "Unknown key 'owner_id' (see templates/README.md for the allowed keys)."),
        ({"python": "import os"}, "Unknown key 'python' (see templates/README.md for the allowed keys)."),
        (
            {"blanks": [{"key": "business_name", "label": "B", "python": "x"}, {"key": "tone", "label": "T"}]},
            "Unknown key 'python' in blanks > item 1 (see templates/README.md for the allowed keys).",
        ),
        (
            {"model": {"temperature": 0.3, "trust_remote_code": True}},
            "Unknown key 'trust_remote_code' in model (see templates/README.md for the allowed keys).",
        ),
        (
            {"instructions": "Hello ${missing}. {business_name} {tone}"},
            "In the instructions, ${missing} is not allowed: write blanks as {missing}, without the '$'.",
        ),
        (
            {"instructions": "Hello {business_name} {tone} {undeclared}."},
            "{undeclared} is used in the instructions but is not declared under blanks.",
        ),
        (
            {"starters": ["Ask {nobody} about {business_name}"]},
            "{nobody} is used in starter 1 but is not declared under blanks.",
        ),
        ({"instructions": "Only {business_name}."}, "The blank 'tone' is declared but not used in the instructions or starters."),
        (
            {"blanks": [{"key": "business_name", "label": "A"}, {"key": "business_name", "label": "B"}, {"key": "tone", "label": "T"}]},
            "The blank 'business_name' is declared more than once.",
        ),
        (
            {"instructions": "{business_name.__class__} {tone}"},
            "In the instructions, {business_name.__class__} is not a simple blank: use lowercase letters, digits and "
            "underscores, like {business_name}.",
        ),
        (
            {"instructions": "{business_name[0]} {tone}"},
            "In the instructions, {business_name[0]} is not a simple blank: use lowercase letters, digits and "
            "underscores, like {business_name}.",
        ),
        (
            {"instructions": "{business_name!r} {tone}"},
            "In the instructions, {business_name!r} is not allowed: write blanks as plain {business_name}, with "
            "nothing after the name.",
        ),
        (
            {"instructions": "{business_name:>40} {tone}"},
            "In the instructions, {business_name:>40} is not allowed: write blanks as plain {business_name}, with "
            "nothing after the name.",
        ),
        (
            {"instructions": "{business_name} {tone} and {}"},
            "In the instructions, {} is empty: put the blank's key inside, like {business_name}.",
        ),
        (
            {"instructions": "Use JSON like {business_name} {tone} {\"a\": 1}"},
            "In the instructions, {\"a\": 1} is not a simple blank: use lowercase letters, digits and underscores, "
            "like {business_name}.",
        ),
        (
            {"instructions": "{business_name} is {tone} }"},
            "In the instructions, there is a stray '{' or '}' near “{business_name} is {tone} }”: write blanks like "
            "{business_name} and use no other braces.",
        ),
        (
            {"instructions": "{business_name} is {tone} {"},
            "In the instructions, there is a stray '{' or '}' near “{business_name} is {tone} {”: write blanks like "
            "{business_name} and use no other braces.",
        ),
        (
            {"instructions": "{{business_name}} {tone}"},
            "In the instructions, double braces ({{ or }}) are not allowed: write blanks like {business_name}.",
        ),
        (
            {"instructions": "{business_name:} {tone}"},
            "In the instructions, there is a stray '{' or '}' near “{business_name:} {tone}”: write blanks like "
            "{business_name} and use no other braces.",
        ),
        (
            {"instructions": "{Business} {business_name} {tone}"},
            "In the instructions, {Business} is not a simple blank: use lowercase letters, digits and underscores, "
            "like {business_name}.",
        ),
        ({"name": "Helper for {business_name}"}, "Blanks like {name} only work in the instructions and starters, not in the name."),
        ({"test_questions": ["Hi", "Hello", "{x}?"]}, "Blanks like {name} only work in the instructions and starters, not in test questions."),
        ({"test_questions": ["One?", "Two?"]}, "test_questions: List should have at least 3 items after validation, not 2."),
        ({"model": {"temperature": 5}}, "model > temperature: Input should be less than or equal to 2."),
        ({"icon": "robot"}, "The icon must be one emoji, like 🛟."),
        ({"instructions": "   "}, "The instructions are empty."),
        ({"id": "Mini"}, "The id 'Mini' is not valid: use lowercase letters, digits and hyphens, like customer-support."),
        ({"id": "other"}, "The id 'other' must match the file name: use id: mini."),
        (
            {"blanks": [{"key": "Business", "label": "B"}]},
            "The blank key 'Business' is not valid: use lowercase letters, digits and underscores, starting with a "
            "letter (like business_name).",
        ),
        ({"name": None}, "name: Input should be a valid string."),
        ({"test_questions": None}, "test_questions: Input should be a valid list."),
    ],
)
def test_invalid_template_is_reported_and_skipped(tmp_path, change, message):
    write_template(tmp_path, minimal(id="good"))
    write_template(tmp_path, minimal(**change), stem="mini")
    catalog = load_templates(tmp_path)
    assert only_problem(catalog, "mini") == message
    assert [t.id for t in catalog.templates] == ["good"]


def test_missing_key_is_reported(tmp_path):
    data = minimal()
    del data["instructions"]
    write_template(tmp_path, data)
    assert only_problem(load_templates(tmp_path), "mini") == "Missing key 'instructions'."


def test_several_errors_are_counted(tmp_path):
    write_template(tmp_path, minimal(trusted=True, owner_id="x", python="y"))
    message = only_problem(load_templates(tmp_path), "mini")
    assert message == "Unknown key 'trusted' (see templates/README.md for the allowed keys). (and 2 more)"


@pytest.mark.parametrize(
    "content, message",
    [
        ("id: mini\nname: [unclosed\n", "The file is not valid YAML (line 3, column 1): expected ',' or ']', but got '<stream end>'."),
        ("- id: mini\n- name: x\n", "The file must be a YAML mapping (key: value lines), not a list."),
        ("just a sentence\n", "The file must be a YAML mapping (key: value lines), not a single value."),
        ("", "The file is empty."),
        ("# only a comment\n", "The file is empty."),
        (b"id: mini\nname: \xff\xfe\n", "The file is not UTF-8 text."),
        ("[" * 2000, "The file is too complex: it has too many nested or repeated values."),
    ],
    ids=["bad-yaml", "list", "scalar", "empty", "comment", "not-utf8", "deep"],
)
def test_unreadable_file_is_reported_and_others_still_load(tmp_path, content, message):
    write_template(tmp_path, minimal(id="good"))
    write(tmp_path, "mini", content)
    catalog = load_templates(tmp_path)
    assert only_problem(catalog, "mini") == message
    assert [t.id for t in catalog.templates] == ["good"]


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/name:os.system",
        "!!python/object:builtins.object {{}}",
    ],
)
def test_python_tags_are_refused_and_never_run(tmp_path, tag):
    marker = tmp_path / "pwned"
    write(tmp_path, "mini", f"id: mini\nname: {tag.format(marker=marker)}\n")
    catalog = load_templates(tmp_path)
    message = only_problem(catalog, "mini")
    assert message.startswith("The file uses a YAML tag that is not allowed (line 2, column 7)")
    assert not marker.exists()


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 10)}]")
    lines.append("starters: *i")
    write(tmp_path, "mini", "\n".join(lines) + "\n")
    started = time.monotonic()
    catalog = load_templates(tmp_path)
    assert time.monotonic() - started < 2
    assert only_problem(catalog, "mini") == "The file is too complex: it has too many nested or repeated values."


def test_huge_instructions_file_is_refused_quickly(tmp_path):
    text = yaml.safe_dump(minimal(), allow_unicode=True, sort_keys=False)
    huge = "x" * (10 * 1024 * 1024)
    text = text.replace("instructions: You help", f"instructions: {huge} You help")
    assert len(text) > 10 * 1024 * 1024
    write_template(tmp_path, minimal(id="good"))
    write(tmp_path, "mini", text)
    started = time.monotonic()
    catalog = load_templates(tmp_path)
    assert time.monotonic() - started < 2
    assert only_problem(catalog, "mini") == "The file is too big: keep templates under 256 KB."
    assert [t.id for t in catalog.templates] == ["good"]


def test_huge_instructions_value_is_a_clear_validation_error_quickly():
    data = minimal(instructions="{business_name} {tone} " + "x" * (10 * 1024 * 1024))
    started = time.monotonic()
    with pytest.raises(ValidationError) as err:
        Template.model_validate(data)  # straight to the schema, as if it came from somewhere without a file cap
    assert time.monotonic() - started < 2
    assert describe(err.value) == (
        f"The instructions are too long (10,485,783 characters); keep them under {MAX_TEMPLATE_INSTRUCTIONS:,}."
    )


def test_instructions_just_under_the_cap_load(tmp_path):
    text = "{business_name} {tone} " + "y" * (MAX_TEMPLATE_INSTRUCTIONS - 30)
    template = Template.model_validate(minimal(instructions=text))
    assert len(template.instructions) <= MAX_TEMPLATE_INSTRUCTIONS


def test_fifo_and_directories_are_skipped_without_blocking(tmp_path):
    write_template(tmp_path, minimal(id="good"))
    (tmp_path / "folder.yaml").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.yaml")
    catalog = load_templates(tmp_path)
    assert [t.id for t in catalog.templates] == ["good"]
    assert {p.message for p in catalog.problems} == {"The path is not a regular file."}


def test_parse_template_without_a_file():
    template = parse_template(yaml.safe_dump(minimal()))
    assert template.id == "mini"
    with pytest.raises(InvalidTemplate) as err:
        parse_template(yaml.safe_dump(minimal()), template_id="other")
    assert err.value.message == "The id 'mini' must match the file name: use id: other."


# ---------------------------------------------------------------------------
# Placeholders
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, keys",
    [
        ("no blanks here", []),
        ("{a} and {b_2} and {a}", ["a", "b_2", "a"]),
        ("Price: $5, email {contact}.", ["contact"]),
    ],
)
def test_placeholders_accepts_simple_blanks(text, keys):
    assert placeholders(text, "the instructions") == keys


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


@pytest.fixture
def template() -> Template:
    return Template.model_validate(
        minimal(
            blanks=[
                {"key": "business_name", "label": "Business name", "example": "Acme"},
                {"key": "tone", "label": "Tone", "example": "friendly"},
            ]
        )
    )


@pytest.mark.parametrize(
    "blanks, message",
    [
        ({}, "Fill in: Business name, Tone."),
        ({"business_name": "Acme"}, "Fill in: Tone."),
        ({"business_name": "   ", "tone": "\x00\x07"}, "Fill in: Business name, Tone."),
        ({"business_name": "Acme", "tone": "calm", "owner_id": "x"}, "This template has no blank called 'owner_id'."),
        ({"business_name": "A" * 501, "tone": "calm"}, "Business name is too long: keep it under 500 characters."),
        ({"business_name": 42, "tone": "calm"}, "Business name must be text."),
    ],
    ids=["none", "one-missing", "blank-after-cleaning", "unknown-key", "too-long", "not-text"],
)
def test_render_rejects_bad_blanks(template, blanks, message):
    with pytest.raises(InvalidInput) as err:
        render(template, blanks)
    assert err.value.message == message


def test_render_keeps_braces_in_values_literal(template):
    spec = render(template, {"business_name": "{tone} {0} {__class__} ${x} {{", "tone": "calm"})
    assert spec.instructions == "You help customers of {tone} {0} {__class__} ${x} {{. Be calm."
    assert spec.starters == ["What does {tone} {0} {__class__} ${x} {{ do?"]
    assert spec.blanks == {"business_name": "{tone} {0} {__class__} ${x} {{", "tone": "calm"}


def test_render_cleans_values(template):
    spec = render(template, {"business_name": "  Acme\x00 Ltd\u200b ", "tone": "\tcalm\r\n"})
    assert spec.instructions == "You help customers of Acme Ltd. Be calm."
    assert spec.blanks == {"business_name": "Acme Ltd", "tone": "calm"}


def test_render_sets_the_gpt_fields(template):
    spec = render(template, {"business_name": "Acme", "tone": "calm"}, name="Acme help desk")
    assert spec.name == "Acme help desk"
    assert spec.description == "A tiny helper for tests."
    assert spec.avatar == "🧪"
    assert spec.template_id == "mini"
    assert spec.generation == GenerationSettings(temperature=0.3, top_p=0.9, max_new_tokens=128, repetition_penalty=1.1)
    assert spec.starters == ["What does Acme do?"]


def test_render_reports_a_starter_that_becomes_too_long(template):
    with pytest.raises(InvalidInput) as err:
        render(template, {"business_name": "A" * 300, "tone": "calm"})
    assert err.value.message == "A conversation starter is too long: keep each under 200 characters."


def test_blank_model_refuses_unknown_keys():
    with pytest.raises(ValidationError):
        Blank.model_validate({"key": "x", "label": "X", "trusted": True})
    assert Blank(key="x", label="X").required is True


def test_module_never_executes_or_formats_template_text():
    """Static guard: only yaml.safe_load, and no str.format/eval/exec on template or user text."""
    import ast

    import personal_gpt.templates as module

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    methods, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                methods.add(node.func.attr)
            elif isinstance(node.func, ast.Name):
                functions.add(node.func.id)
    assert "safe_load" in methods
    assert not methods & {"load", "load_all", "unsafe_load", "full_load", "format", "format_map"}
    assert not functions & {"eval", "exec", "compile", "__import__"}
