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


_OPTIONAL_TEXT = ("timestamp", "model", "tenant", "route")


def conversation_row(**fields) -> dict:
    """`Conversation(**fields).row()`, without building the model when every field already has
    exactly the type the model would give it (plain str, int >= 1, known role and domain, messages
    of role and content only): the common case, where validation would only copy. Anything else
    goes through the model, which converts or raises as it always did."""
    messages = fields.get("messages")
    if (
        type(fields.get("id")) is str and type(fields.get("source")) is str
        and type(fields.get("line")) is int and fields["line"] >= 1
        and fields.get("domain", "other") in DOMAINS and type(fields.get("domain", "other")) is str
        and type(messages) is list
        and len(fields) <= len(COLUMNS) and all(k in _FIELDS for k in fields)
        and all(fields.get(k) is None or type(fields[k]) is str for k in _OPTIONAL_TEXT)
    ):
        out = []
        for m in messages:
            if type(m) is not dict or len(m) != 2:
                break
            role, content = m.get("role"), m.get("content")
            if type(role) is not str or role not in ROLES or type(content) is not str:
                break
            out.append({"role": role, "content": content})
        else:
            return {"id": fields["id"], "source": fields["source"], "line": fields["line"],
                    **{k: fields.get(k) for k in _OPTIONAL_TEXT}, "domain": fields.get("domain", "other"),
                    "messages": out}
    return Conversation(**fields).row()


_FIELDS = frozenset(COLUMNS)


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
