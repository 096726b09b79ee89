"""Settings from the environment, with embedded defaults.

``PERSONAL_GPT_HOME`` isolates all state (database, model cache, files);
``PERSONAL_GPT_DATABASE_URL`` switches the store to PostgreSQL. Nothing here
imports heavy libraries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LOCAL_MODEL = "bundled:smollm2-135m-instruct"


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        return default


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    default_model: str = DEFAULT_LOCAL_MODEL
    templates_dir: Path = field(default_factory=lambda: Path(__file__).resolve().parent.parent / "templates")
    torch_threads: int = 0
    max_batch: int = 8
    model_cache: Path | None = None  # PERSONAL_GPT_MODEL_CACHE: share converted models between homes
    max_upload_mb: int = 50  # PGPT_MAX_UPLOAD_MB: one knowledge file
    max_gpt_knowledge_mb: int = 500  # PGPT_MAX_GPT_KNOWLEDGE_MB: all of one GPT's knowledge files

    @property
    def model_cache_dir(self) -> Path:
        return self.model_cache or self.home / "models"

    @property
    def secret_key_file(self) -> Path:
        return self.home / "secret.key"

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(os.environ.get("PERSONAL_GPT_HOME") or Path.home() / ".personal-gpt").expanduser()
        db_url = os.environ.get("PERSONAL_GPT_DATABASE_URL") or f"sqlite:///{home / 'personal-gpt.db'}"
        templates = os.environ.get("PERSONAL_GPT_TEMPLATES_DIR")
        kwargs = {}
        if templates:
            kwargs["templates_dir"] = Path(templates)
        cache = os.environ.get("PERSONAL_GPT_MODEL_CACHE")
        if cache:
            kwargs["model_cache"] = Path(cache).expanduser()
        return cls(
            home=home,
            database_url=db_url,
            default_model=os.environ.get("PERSONAL_GPT_DEFAULT_MODEL") or DEFAULT_LOCAL_MODEL,
            torch_threads=_int_env("PERSONAL_GPT_TORCH_THREADS", 0),
            max_batch=max(1, _int_env("PERSONAL_GPT_MAX_BATCH", 8)),
            max_upload_mb=max(1, _int_env("PGPT_MAX_UPLOAD_MB", 50)),
            max_gpt_knowledge_mb=max(1, _int_env("PGPT_MAX_GPT_KNOWLEDGE_MB", 500)),
            **kwargs,
        )

    def ensure_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
