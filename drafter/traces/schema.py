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


def conversation_row(*, id: str, source: str, line: int, timestamp: str | None = None, model: str | None = None,
                     tenant: str | None = None, route: str | None = None, domain: str = "other",
                     messages: list) -> dict:
    """`Conversation(...).row()`, without building the model when every field already has
    exactly the type the model would give it (plain str, int >= 1, known role and domain, messages
    of role and content only): the common case, where validation would only copy. Anything else
    goes through the model, which converts or raises as it always did."""
    if (
        type(id) is str and type(source) is str and type(line) is int and line >= 1
        and type(domain) is str and domain in DOMAINS and type(messages) is list
        and (timestamp is None or type(timestamp) is str) and (model is None or type(model) is str)
        and (tenant is None or type(tenant) is str) and (route is None or type(route) is str)
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
            return {"id": id, "source": source, "line": line, "timestamp": timestamp, "model": model,
                    "tenant": tenant, "route": route, "domain": domain, "messages": out}
    return Conversation(id=id, source=source, line=line, timestamp=timestamp, model=model, tenant=tenant,
                        route=route, domain=domain, messages=messages).row()


def record_id(raw: bytes | str, sub: str = "", sha256: str | None = None) -> str:
    """Stable id of a conversation: a hash of the raw record (plus its index inside it).
    `sha256`: the record's SHA-256 (hex), if known already."""
    if sha256 and not sub:
        return sha256[:16]
    data = raw.encode() if isinstance(raw, str) else raw
    h = hashlib.sha256(data)
    if sub:
        h.update(b"\0" + sub.encode())
    return h.hexdigest()[:16]


def row_schema():
    """The Arrow schema of the train/holdout datasets (pyarrow alone: the ingesting process
    parses rows with it without importing `datasets`)."""
    import pyarrow as pa

    text = pa.string()
    return pa.schema([("id", text), ("source", text), ("line", pa.int64()), ("timestamp", text), ("model", text),
                      ("tenant", text), ("route", text), ("domain", text),
                      ("messages", pa.list_(pa.struct([("role", text), ("content", text)])))])


def features():
    """Hugging Face `datasets` features of the train/holdout datasets (`row_schema`'s)."""
    from datasets import Features

    return Features.from_arrow_schema(row_schema())


def rows_table(lines: list[bytes]):
    """Dataset rows (JSON lines as `Conversation.row()` writes them) as an Arrow table of
    `row_schema`, parsed by Arrow's JSON reader (C++): a field of another name or type is an error."""
    import pyarrow as pa
    from pyarrow import json as paj

    data = b"".join(lines)
    return paj.read_json(
        pa.py_buffer(data),
        # one block (a block must hold a whole row) on this thread: the workers have the other cores
        read_options=paj.ReadOptions(use_threads=False, block_size=max(len(data), 1 << 16)),
        parse_options=paj.ParseOptions(explicit_schema=row_schema(), unexpected_field_behavior="error"),
    )
