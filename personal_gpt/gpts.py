"""The GPT definition: what a creator edits and what a version freezes.

``GptSpec`` is plain, validated data (pydantic, unknown keys refused). Storage
of drafts and versions lives in ``store``; this module never touches the
database or a model.
"""

from __future__ import annotations

import re
import unicodedata

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_NAME = 80
MAX_DESCRIPTION = 500
MAX_INSTRUCTIONS_CHARS = 100_000
MAX_STARTERS = 6
MAX_STARTER_CHARS = 200
MAX_AVATAR_DATA_URI = 400_000  # ~300 KB image once base64-decoded
DEFAULT_AVATAR = "🤖"
MAX_REFUSAL_CHARS = 300
STRICTNESS_LEVELS = ("lenient", "balanced", "strict")

_IMAGE_URI = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=]+$")


def clean_text(value: str) -> str:
    """Normalise to NFC and drop control characters other than newlines/tabs."""
    value = unicodedata.normalize("NFC", value)
    return "".join(ch for ch in value if ch in "\n\t" or unicodedata.category(ch)[0] != "C")


class GenerationSettings(BaseModel):
    """How the model writes. ``temperature == 0`` means greedy (deterministic)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(384, ge=1, le=4096)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GptSpec(BaseModel):
    """Everything that defines a GPT's behaviour and look."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    avatar: str = DEFAULT_AVATAR
    instructions: str = ""
    starters: list[str] = Field(default_factory=list)
    model: str = ""  # "" = the install's default model; else a model reference
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    template_id: str | None = None
    blanks: dict[str, str] = Field(default_factory=dict)
    knowledge_only: bool = False  # answer only from the knowledge files; say "I don't know" otherwise
    # how sure a knowledge-only answer must be of its evidence: lenient, balanced or strict
    strictness: str = "balanced"
    # what a knowledge-only GPT says when the files do not cover a question ("" = worded from the blanks)
    refusal: str = ""
    # show visitors on share links (and the widget/API) the file, page and sentence an answer came from
    show_sources: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = " ".join(clean_text(v).split())
        if not v:
            raise ValueError("Give your GPT a name.")
        if len(v) > MAX_NAME:
            raise ValueError(f"The name is too long: keep it under {MAX_NAME} characters.")
        return v

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        v = clean_text(v).strip()
        if len(v) > MAX_DESCRIPTION:
            raise ValueError(f"The description is too long: keep it under {MAX_DESCRIPTION} characters.")
        return v

    @field_validator("instructions")
    @classmethod
    def _instructions(cls, v: str) -> str:
        v = clean_text(v).strip()
        if len(v) > MAX_INSTRUCTIONS_CHARS:
            raise ValueError(
                f"The instructions are too long ({len(v):,} characters); keep them under {MAX_INSTRUCTIONS_CHARS:,}."
            )
        return v

    @field_validator("avatar")
    @classmethod
    def _avatar(cls, v: str) -> str:
        v = (v or "").strip() or DEFAULT_AVATAR
        if v.startswith("data:"):
            if len(v) > MAX_AVATAR_DATA_URI or not _IMAGE_URI.match(v):
                raise ValueError("The avatar image must be a PNG, JPEG, GIF or WebP under 300 KB.")
            return v
        if len(v) > 16:
            raise ValueError("The avatar must be one emoji or an uploaded image.")
        return clean_text(v)

    @field_validator("starters")
    @classmethod
    def _starters(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for s in v:
            s = " ".join(clean_text(s).split())
            if not s or s in out:
                continue
            if len(s) > MAX_STARTER_CHARS:
                raise ValueError(f"A conversation starter is too long: keep each under {MAX_STARTER_CHARS} characters.")
            out.append(s)
        if len(out) > MAX_STARTERS:
            raise ValueError(f"Use at most {MAX_STARTERS} conversation starters.")
        return out

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return (v or "").strip()

    @field_validator("strictness")
    @classmethod
    def _strictness(cls, v: str) -> str:
        v = (v or "").strip().lower() or "balanced"
        if v not in STRICTNESS_LEVELS:
            raise ValueError("Strictness must be lenient, balanced or strict.")
        return v

    @field_validator("refusal")
    @classmethod
    def _refusal(cls, v: str) -> str:
        v = " ".join(clean_text(v or "").split())
        if len(v) > MAX_REFUSAL_CHARS:
            raise ValueError(f"The \"I don't know\" message is too long: keep it under {MAX_REFUSAL_CHARS} characters.")
        return v


def refusal_message(spec: GptSpec, default: str) -> str:
    """What a knowledge-only GPT says when its files do not cover a question: the
    creator's own wording, else ``default`` plus who to contact when the template's
    blanks name a business (and a contact), else ``default``."""
    if spec.refusal:
        text = spec.refusal
        for key, value in spec.blanks.items():
            text = text.replace("{" + key + "}", value)
        return text
    business = (spec.blanks.get("business_name") or "").strip()
    if not business:
        return default
    contact = (spec.blanks.get("contact") or spec.blanks.get("contact_details") or "").strip()
    return f"{default} Please contact {business}" + (f" at {contact}." if contact else ".")
