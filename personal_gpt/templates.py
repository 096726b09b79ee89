"""GPT templates: load ``templates/*.yaml``, validate them, and render one into a GptSpec draft.

Template files are data only: read with a size cap, parsed with ``yaml.safe_load``,
checked by strict pydantic models (unknown keys refused). Nothing in a template is
ever executed, imported or passed to ``str.format``; a broken file is reported, not fatal.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from personal_gpt.errors import InvalidInput, InvalidTemplate, NotFound
from personal_gpt.gpts import (
    MAX_DESCRIPTION,
    MAX_NAME,
    MAX_STARTER_CHARS,
    MAX_STARTERS,
    GenerationSettings,
    GptSpec,
    clean_text,
)

MAX_TEMPLATE_FILE_BYTES = 256 * 1024
MAX_TEMPLATE_FILES = 500
MAX_TEMPLATE_INSTRUCTIONS = 20_000
MAX_BLANKS = 20
MAX_BLANK_VALUE = 500
MAX_YAML_NODES = 20_000
MAX_YAML_DEPTH = 20

BLANK_KEY = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
TEMPLATE_ID = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_TOKEN = re.compile(r"\{([a-z][a-z0-9_]{0,39})\}")
_FORMATTER = string.Formatter()


# ---------------------------------------------------------------------------
# Placeholders
# ---------------------------------------------------------------------------


def _near(text: str, index: int) -> str:
    snippet = " ".join(text[max(0, index - 30) : index + 30].split())
    return f"“{snippet}”"


def _first_stray_brace(text: str) -> int:
    """Index of the first brace that is not part of a simple ``{key}`` token."""
    pos = 0
    for m in _TOKEN.finditer(text):
        for i in range(pos, m.start()):
            if text[i] in "{}":
                return i
        pos = m.end()
    for i in range(pos, len(text)):
        if text[i] in "{}":
            return i
    return -1


def placeholders(text: str, where: str) -> list[str]:
    """The ``{key}`` blanks in ``text``, in order; ValueError naming the problem otherwise.

    ``where`` names the text in the message, e.g. "the instructions" or "starter 2".
    Only plain ``{key}`` is allowed: no ``${x}``, ``{x.attr}``, ``{x[0]}``, ``{x!r}``,
    ``{x:fmt}``, ``{{``/``}}`` or stray braces, so rendering can never be ambiguous.
    """
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError:
        i = _first_stray_brace(text)
        raise ValueError(
            f"In {where}, there is a stray '{{' or '}}' near {_near(text, max(i, 0))}: "
            "write blanks like {business_name} and use no other braces."
        ) from None
    keys: list[str] = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if literal.endswith("$"):
            raise ValueError(f"In {where}, ${shown} is not allowed: write blanks as {shown}, without the '$'.")
        if shown == "{}":
            raise ValueError(f"In {where}, {{}} is empty: put the blank's key inside, like {{business_name}}.")
        if not BLANK_KEY.match(name):
            raise ValueError(
                f"In {where}, {shown} is not a simple blank: use lowercase letters, digits and underscores, "
                "like {business_name}."
            )
        if conversion or spec:
            raise ValueError(
                f"In {where}, {shown} is not allowed: write blanks as plain {{{name}}}, with nothing after the name."
            )
        keys.append(name)
    if "{{" in text or "}}" in text:
        raise ValueError(
            f"In {where}, double braces ({{{{ or }}}}) are not allowed: write blanks like {{business_name}}."
        )
    i = _first_stray_brace(text)
    if i >= 0:  # e.g. "{x:}", which Formatter accepts as a plain field
        raise ValueError(
            f"In {where}, there is a stray '{{' or '}}' near {_near(text, i)}: "
            "write blanks like {business_name} and use no other braces."
        )
    return keys


def _no_braces(text: str, where: str) -> str:
    if "{" in text or "}" in text:
        raise ValueError(f"Blanks like {{name}} only work in the instructions and starters, not in {where}.")
    return text


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class Blank(BaseModel):
    """One fill-in-the-blank a creator answers, e.g. ``{business_name}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    label: str = Field(min_length=1, max_length=60)
    help: str = Field("", max_length=300)
    example: str = Field("", max_length=200)
    required: bool = True
    default: str = Field("", max_length=MAX_BLANK_VALUE)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not BLANK_KEY.match(v):
            raise ValueError(
                f"The blank key '{v[:50]}' is not valid: use lowercase letters, digits and underscores, "
                "starting with a letter (like business_name)."
            )
        return v

    @field_validator("label", "help", "example", "default")
    @classmethod
    def _text(cls, v: str, info) -> str:
        return _no_braces(v.strip(), f"a blank's {info.field_name}")


class Template(BaseModel):
    """A GPT template as written in ``templates/<id>.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str = Field(min_length=1, max_length=MAX_NAME)
    description: str = Field(min_length=1, max_length=MAX_DESCRIPTION)
    icon: str
    category: str = Field(min_length=1, max_length=40)
    order: int = Field(1000, ge=0, le=1_000_000)
    instructions: str
    blanks: list[Blank] = Field(default_factory=list, max_length=MAX_BLANKS)
    starters: list[str] = Field(default_factory=list, max_length=MAX_STARTERS)
    suggested_knowledge: list[str] = Field(default_factory=list, max_length=12)
    model: GenerationSettings = Field(default_factory=GenerationSettings)
    test_questions: list[str] = Field(min_length=3, max_length=20)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if len(v) > 64 or not TEMPLATE_ID.match(v):
            raise ValueError(
                f"The id '{v[:64]}' is not valid: use lowercase letters, digits and hyphens, like customer-support."
            )
        return v

    @field_validator("name", "description", "category")
    @classmethod
    def _plain(cls, v: str, info) -> str:
        return _no_braces(" ".join(v.split()), f"the {info.field_name}")

    @field_validator("icon")
    @classmethod
    def _icon(cls, v: str) -> str:
        v = v.strip()
        if not v or len(v) > 16 or v.isascii() or any(ch.isspace() for ch in v):
            raise ValueError("The icon must be one emoji, like 🛟.")
        return v

    @field_validator("instructions", mode="before")
    @classmethod
    def _instructions_size(cls, v: object) -> object:
        # Checked before anything else touches the text, so a huge string fails fast.
        if isinstance(v, str) and len(v) > MAX_TEMPLATE_INSTRUCTIONS:
            raise ValueError(
                f"The instructions are too long ({len(v):,} characters); keep them under {MAX_TEMPLATE_INSTRUCTIONS:,}."
            )
        return v

    @field_validator("instructions")
    @classmethod
    def _instructions(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("The instructions are empty.")
        return v

    @field_validator("starters")
    @classmethod
    def _starters(cls, v: list[str]) -> list[str]:
        out = [" ".join(s.split()) for s in v]
        for i, s in enumerate(out, 1):
            if not s:
                raise ValueError(f"Starter {i} is empty.")
            if len(s) > MAX_STARTER_CHARS:
                raise ValueError(f"Starter {i} is too long: keep each under {MAX_STARTER_CHARS} characters.")
        return out

    @field_validator("suggested_knowledge", "test_questions")
    @classmethod
    def _items(cls, v: list[str], info) -> list[str]:
        what = info.field_name.replace("_", " ")
        out = [" ".join(s.split()) for s in v]
        for i, s in enumerate(out, 1):
            if not s:
                raise ValueError(f"Item {i} of {what} is empty.")
            if len(s) > 300:
                raise ValueError(f"Item {i} of {what} is too long: keep each under 300 characters.")
            _no_braces(s, what)
        return out

    @model_validator(mode="after")
    def _blanks_match(self) -> "Template":
        declared: list[str] = []
        for blank in self.blanks:
            if blank.key in declared:
                raise ValueError(f"The blank '{blank.key}' is declared more than once.")
            declared.append(blank.key)
        used: list[str] = []
        texts = [("the instructions", self.instructions)]
        texts += [(f"starter {i}", s) for i, s in enumerate(self.starters, 1)]
        for where, text in texts:
            for key in placeholders(text, where):
                if key not in declared:
                    raise ValueError(f"{{{key}}} is used in {where} but is not declared under blanks.")
                used.append(key)
        for key in declared:
            if key not in used:
                raise ValueError(f"The blank '{key}' is declared but not used in the instructions or starters.")
        return self

    def example_blanks(self) -> dict[str, str]:
        """Each blank's example (or default): what the builder shows as a hint and tests render with."""
        return {b.key: b.example or b.default for b in self.blanks}


@dataclass(frozen=True)
class TemplateProblem:
    """A template file that was skipped, and why, in one sentence."""

    file: Path
    message: str


@dataclass
class TemplateCatalog:
    """The templates that loaded (sorted by ``order``, then name) and the files that did not."""

    templates: list[Template] = field(default_factory=list)
    problems: list[TemplateProblem] = field(default_factory=list)

    def get(self, template_id: str) -> Template:
        for template in self.templates:
            if template.id == template_id:
                return template
        shown = " ".join(clean_text(str(template_id)).split())
        if len(shown) > 60:
            shown = shown[:60] + "…"
        raise NotFound(f"There is no template called '{shown}'.")

    def __len__(self) -> int:
        return len(self.templates)

    def __iter__(self):
        return iter(self.templates)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _where(loc: tuple) -> str:
    return " > ".join(f"item {p + 1}" if isinstance(p, int) else str(p) for p in loc)


def _sentence(error: dict) -> str:
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        inside = f" in {_where(loc[:-1])}" if loc[:-1] else ""
        return f"Unknown key '{str(loc[-1])[:50]}'{inside} (see templates/README.md for the allowed keys)."
    if kind == "missing":
        inside = f" in {_where(loc[:-1])}" if loc[:-1] else ""
        return f"Missing key '{loc[-1]}'{inside}."
    msg = str(error.get("msg", "is not valid"))
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    msg = msg.rstrip(".") + "."
    return f"{_where(loc)}: {msg}" if loc else msg


def describe(exc: ValidationError) -> str:
    """One sentence for the first validation error, and how many more there are."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = _sentence(errors[0]) if errors else "The template is not valid."
    more = len(errors) - 1
    return f"{first} (and {more} more)" if more > 0 else first


def _check_shape(data: object) -> None:
    """Bound the loaded YAML: YAML aliases can make a small file expand into a huge tree."""
    stack = [(data, 0)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
            raise InvalidTemplate("The file is too complex: it has too many nested or repeated values.")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


_BRACKET = re.compile(r"[\[\]{}]")


def _bracket_depth(text: str) -> int:
    """Deepest nesting of [ and { (a cheap over-estimate: brackets inside quotes count too)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(text):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - 1)
    return deepest


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "it could not be read"
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        return (
            f"The file uses a YAML tag that is not allowed{at}: templates contain plain text, lists and numbers only."
        )
    return f"The file is not valid YAML{at}: {problem}."


def parse_template(source: str | bytes, template_id: str | None = None) -> Template:
    """Parse and validate one template's YAML text; ``InvalidTemplate`` with one sentence otherwise.

    ``template_id`` (the file stem) must equal the template's ``id`` when given.
    """
    if len(source) > MAX_TEMPLATE_FILE_BYTES:
        raise InvalidTemplate(f"The file is too big: keep templates under {MAX_TEMPLATE_FILE_BYTES // 1024} KB.")
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidTemplate("The file is not UTF-8 text.") from None
    if _bracket_depth(source) > MAX_YAML_DEPTH:  # deep flow nesting is slow for PyYAML to refuse
        raise InvalidTemplate("The file is too complex: it has too many nested or repeated values.")
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise InvalidTemplate(_yaml_reason(exc)) from None
    except RecursionError:
        raise InvalidTemplate("The file is too complex: it has too many nested or repeated values.") from None
    if data is None:
        raise InvalidTemplate("The file is empty.")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else "a single value"
        raise InvalidTemplate(f"The file must be a YAML mapping (key: value lines), not {kind}.")
    _check_shape(data)
    try:
        template = Template.model_validate(data)
    except ValidationError as exc:
        raise InvalidTemplate(describe(exc)) from None
    if template_id is not None and template.id != template_id:
        raise InvalidTemplate(f"The id '{template.id}' must match the file name: use id: {template_id}.")
    return template


def load_template(path: Path) -> Template:
    """Read one template file with a size cap, then parse it; ``InvalidTemplate`` on any problem."""
    path = Path(path)
    if not path.is_file():  # also refuses FIFOs and devices, which could block a read
        raise InvalidTemplate("The path is not a regular file.")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_TEMPLATE_FILE_BYTES + 1)
    except OSError:
        raise InvalidTemplate("The file could not be read.") from None
    return parse_template(raw, template_id=path.stem)


def load_templates(directory: Path) -> TemplateCatalog:
    """Load every ``*.yaml`` in ``directory``. Broken files go to ``problems``; never raises for a bad file."""
    directory = Path(directory)
    catalog = TemplateCatalog()
    if not directory.is_dir():
        catalog.problems.append(TemplateProblem(directory, "The templates folder does not exist."))
        return catalog
    paths = sorted(p for p in directory.glob("*.yaml") if not p.name.startswith("."))
    if len(paths) > MAX_TEMPLATE_FILES:
        catalog.problems.append(
            TemplateProblem(
                directory, f"There are too many template files: only the first {MAX_TEMPLATE_FILES} were read."
            )
        )
        paths = paths[:MAX_TEMPLATE_FILES]
    for path in paths:
        try:
            catalog.templates.append(load_template(path))
        except InvalidTemplate as exc:
            catalog.problems.append(TemplateProblem(path, exc.message))
    catalog.templates.sort(key=lambda t: (t.order, t.name.casefold(), t.id))
    return catalog


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _clean_value(value: object, blank: Blank) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{blank.label} must be text.")
    value = clean_text(value).replace("\t", " ").strip()
    if len(value) > MAX_BLANK_VALUE:
        raise InvalidInput(f"{blank.label} is too long: keep it under {MAX_BLANK_VALUE} characters.")
    return value


def _fill(text: str, values: Mapping[str, str]) -> str:
    # One pass over the template text: inserted values are never scanned again, so a
    # value containing "{other_key}" stays literal. Validation guarantees every brace in
    # ``text`` belongs to a declared {key}.
    return _TOKEN.sub(lambda m: values[m.group(1)], text)


def render(template: Template, blanks: Mapping[str, str] | None = None, name: str | None = None) -> GptSpec:
    """Fill the template's blanks and return a GPT draft; ``InvalidInput`` says what to fix."""
    given = dict(blanks or {})
    declared = {b.key: b for b in template.blanks}
    unknown = [str(k) for k in given if k not in declared]
    if unknown:
        shown = ", ".join(f"'{k[:40]}'" for k in unknown[:5])
        raise InvalidInput(f"This template has no blank called {shown}.")
    values: dict[str, str] = {}
    missing: list[str] = []
    for blank in template.blanks:
        value = _clean_value(given.get(blank.key), blank) or blank.default
        if not value and blank.required:
            missing.append(blank.label)
        values[blank.key] = value
    if missing:
        raise InvalidInput(f"Fill in: {', '.join(missing)}.")
    gpt_name = (name or "").strip() or template.name
    try:
        return GptSpec(
            name=gpt_name,
            description=template.description,
            avatar=template.icon,
            instructions=_fill(template.instructions, values),
            starters=[_fill(s, values) for s in template.starters],
            generation=template.model.model_copy(),
            template_id=template.id,
            blanks=values,
        )
    except ValidationError as exc:
        raise InvalidInput(describe(exc)) from None
