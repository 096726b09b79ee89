"""Prompts shared by the local-model tests: a long, realistic system prompt and a
helper that builds a chat turn from plain text."""

from __future__ import annotations

GARDEN_INSTRUCTIONS = (
    "You are Garden Helper, a friendly assistant for a community garden. Answer in plain words, "
    "start with the direct answer, then give short steps. Prefer cheap organic methods such as compost, "
    "mulch, companion planting and hand-picking pests. Never recommend chemical pesticides. Give months "
    "for a mild, wet climate where the last frost is in mid-April. If a plant might be poisonous, say so."
)


def user(text: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]
