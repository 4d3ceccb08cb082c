"""The one record every log format becomes: a `Conversation` (see drafter/CONTRACTS.md).

Datasets on disk hold exactly these columns (`FEATURES`), one row per conversation.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]
Domain = Literal["chat", "code", "math", "other"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
DOMAINS: tuple[str, ...] = ("chat", "code", "math", "other")
COLUMNS: tuple[str, ...] = ("id", "source", "line", "timestamp", "model", "tenant", "route", "domain", "messages")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


class Conversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str  # stable: derived from the record's content, not from where it was found
    source: str  # file it came from
    line: int = Field(ge=1)  # 1-based line (or start line of a JSON array element)
    timestamp: str | None = None  # ISO 8601
    model: str | None = None
    tenant: str | None = None
    route: str | None = None
    domain: Domain = "other"
    messages: list[Message]

    def user_turns(self) -> list[str]:
        return [m.content for m in self.messages if m.role == "user"]

    def row(self) -> dict:
        """The dataset row (plain dicts, column order as on disk)."""
        return self.model_dump(mode="json")


def record_id(raw: bytes | str, sub: str = "") -> str:
    """Stable id of a conversation: a hash of the raw record (plus its index inside it)."""
    data = raw.encode() if isinstance(raw, str) else raw
    h = hashlib.sha256(data)
    if sub:
        h.update(b"\0" + sub.encode())
    return h.hexdigest()[:16]


def features():
    """Hugging Face `datasets` features of the train/holdout datasets."""
    from datasets import Features, List, Value

    text = Value("string")
    return Features(
        {
            "id": text,
            "source": text,
            "line": Value("int64"),
            "timestamp": text,
            "model": text,
            "tenant": text,
            "route": text,
            "domain": text,
            "messages": List({"role": text, "content": text}),
        }
    )
