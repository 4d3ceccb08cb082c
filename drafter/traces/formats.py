"""Log formats -> conversations.

Each format has a `sniff` test on one parsed JSON record and a parser that turns a
record into one or more `Parsed` conversations (messages still unchecked: the filters
decide what is usable). A file's format is detected from its first records; every
record of the file is then parsed with that format's parser.

Formats
- `openai-chat-log`: OpenAI Chat Completions traffic as gateways and proxies log it: the
  request (`model`, `messages`, sampling params; at the top level or under `request` /
  `body`) and the response (`choices[].message`, `usage`; under `response` /
  `response.body`, or `choices` at the top level). Content may be a string or a list of
  content parts; with `n > 1` the choice with the lowest index is the assistant turn.
- `openai-messages`: plain `{"messages": [...]}` records (fine-tuning style).
- `openai-batch-input` / `openai-batch-output`: OpenAI Batch API files (`custom_id`,
  `body` / `response.body`), joined by `custom_id` by the ingest loop.
- `sharegpt`: `{"conversations": [{"from": "human", "value": ...}, ...]}`.
- `otlp`: OpenTelemetry traces as OTLP JSON (`resourceSpans`), one conversation per span
  following the GenAI semantic conventions: `gen_ai.input.messages` /
  `gen_ai.output.messages` / `gen_ai.system_instructions` as span attributes or on a
  `gen_ai.client.inference.operation.details` event, the older per-message events
  (`gen_ai.user.message`, `gen_ai.choice`, ...), `gen_ai.content.prompt|completion`
  events, and flattened `gen_ai.prompt.N.role|content` attributes.

Tool calls become assistant text in the widespread `<tool_call>{"name", "arguments"}
</tool_call>` form; tool results become `tool` messages. Roles are normalised
(`human` -> user, `gpt` -> assistant, `developer` -> system, `function` -> tool).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

ROLE_MAP = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "function_call": "assistant",
    "system": "system", "developer": "system",
    "tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool", "function_response": "tool",
}
TEXT_PART_TYPES = {"text", "input_text", "output_text"}


class NotAConversation(ValueError):
    """A record that parses as JSON but cannot become a conversation; `reason` is short."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Parsed:
    messages: list[dict]  # {"role", "content"}; roles normalised where known, else kept as found
    sub: str = ""  # tells apart several conversations of one record (OTLP spans)
    timestamp: str | None = None
    model: str | None = None
    tenant: str | None = None
    route: str | None = None
    flags: set[str] = field(default_factory=set)  # non_text, error_response
    custom_id: str | None = None  # batch API


# ----- shared helpers ------------------------------------------------------------------
def norm_role(role: Any) -> str:
    if not isinstance(role, str):
        return str(role)
    return ROLE_MAP.get(role.strip().lower(), role)


UNIX_TIME = re.compile(r"\d{9,19}(\.\d+)?")


def iso_time(value: Any) -> str | None:
    """ISO 8601 (UTC) from an ISO string or a Unix time in s, ms, us or ns."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str) and len(value) == 20 and value[19] == "Z" and value[10] == "T":
        # The shape most logs write ("2024-02-03T04:05:06Z") is its own ISO form once it parses
        # as one: a third of the time of the general path below.
        try:
            if datetime.fromisoformat(value[:19]).isoformat() == value[:19]:
                return value
        except ValueError:
            pass
    if isinstance(value, str) and UNIX_TIME.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, (int, float)):
        v = float(value)
        for scale in (1, 1e3, 1e6, 1e9):
            if v / scale < 1e10:
                try:
                    return datetime.fromtimestamp(v / scale, tz=timezone.utc).isoformat().replace("+00:00", "Z")
                except (OverflowError, OSError, ValueError):
                    return None
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(timezone.utc)
            return parsed.isoformat().replace("+00:00", "Z")
        return parsed.isoformat()
    return None


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def render_tool_call(name: Any, arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def content_text(content: Any, flags: set[str]) -> str:
    """A message's text from a string or a list of content parts; other parts set a flag."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise NotAConversation("not_a_conversation", f"message content of type {type(content).__name__}")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            kind = part.get("type", "text")
            if kind in TEXT_PART_TYPES:
                text = part.get("text", part.get("content"))
                if isinstance(text, dict):  # {"type": "text", "text": {"value": ...}} (assistants API)
                    text = text.get("value")
                if isinstance(text, str):
                    texts.append(text)
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            elif kind == "tool_call":
                texts.append(render_tool_call(part.get("name"), part.get("arguments")))
            elif kind == "tool_call_response":
                resp = part.get("response")
                texts.append(resp if isinstance(resp, str) else json.dumps(resp, ensure_ascii=False))
            elif kind in ("reasoning", "thinking"):
                continue  # hidden reasoning is not part of what the target returned as text
            else:
                flags.add("non_text")
        else:
            raise NotAConversation("not_a_conversation", f"content part of type {type(part).__name__}")
    return "\n".join(texts)


def openai_message(msg: Any, flags: set[str]) -> dict:
    """One OpenAI-style message (also legacy `function_call`) -> {role, content}."""
    if not isinstance(msg, dict):
        raise NotAConversation("not_a_conversation", f"message of type {type(msg).__name__}")
    role = norm_role(msg.get("role"))
    text = content_text(msg.get("content"), flags)
    tool_calls = msg.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise NotAConversation("not_a_conversation", f"tool_calls of type {type(tool_calls).__name__}")
    calls = []
    for call in tool_calls:
        if isinstance(call, dict):
            fn = call.get("function") if isinstance(call.get("function"), dict) else call
            calls.append(render_tool_call(fn.get("name"), fn.get("arguments")))
    if isinstance(msg.get("function_call"), dict):
        calls.append(render_tool_call(msg["function_call"].get("name"), msg["function_call"].get("arguments")))
    if calls:
        text = "\n".join([t for t in (text, *calls) if t])
    return {"role": role, "content": text}


def _messages(value: Any, flags: set[str], where: str) -> list[dict]:
    if not isinstance(value, list):
        raise NotAConversation("not_a_conversation", f"{where} is not a list of messages")
    return [openai_message(m, flags) for m in value]


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _items(value: Any) -> list:
    """A field that should be a list, or [] when it is missing or of another type (skipped, as
    other malformed parts of a record are)."""
    return value if isinstance(value, list) else []


def _first(*values: Any) -> Any:
    return next((v for v in values if v not in (None, "")), None)


# Where each field is looked for, in order: (0 = the record, 1 = its metadata, 2 = the response,
# 3 = the request, key). The first value that is neither None nor "" is taken.
META_KEYS = {
    "timestamp": ((0, "timestamp"), (0, "@timestamp"), (0, "time"), (0, "created_at"), (0, "startTime"),
                  (0, "start_time"), (2, "created")),
    "model": ((2, "model"), (3, "model"), (0, "model")),
    "tenant": ((0, "tenant"), (0, "tenant_id"), (1, "tenant"), (1, "tenant_id"), (0, "organization"), (0, "team_id"),
               (1, "team_id")),
    "route": ((0, "route"), (0, "endpoint"), (0, "path"), (0, "url"), (1, "route"), (0, "model_group")),
}


def _meta(obj: dict, request: dict, response: dict) -> dict:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    where = (obj, meta, response, request)
    found = {}
    for name, places in META_KEYS.items():  # = _first(...) of every place, read lazily
        value = None
        for src, key in places:
            v = where[src].get(key)
            if v is not None and v != "":
                value = v
                break
        found[name] = value
    return {
        "timestamp": iso_time(found["timestamp"]),
        "model": _text_or_none(found["model"]),
        "tenant": _text_or_none(found["tenant"]),
        "route": _text_or_none(found["route"]),
    }


def _choice_message(response: dict, flags: set[str]) -> list[dict]:
    """The assistant turn of a chat completion: the choice with the lowest index."""
    choices = response.get("choices")
    if choices is None or choices == []:
        return []
    if not isinstance(choices, list):
        raise NotAConversation("not_a_conversation", f"response choices of type {type(choices).__name__}")
    valid = [c for c in choices if isinstance(c, dict) and isinstance(c.get("message"), dict)]
    if not valid:
        raise NotAConversation("not_a_conversation", "response choices hold no message")
    best = min(valid, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 1 << 30)
    msg = dict(best["message"])
    msg.setdefault("role", "assistant")
    return [openai_message(msg, flags)]


# ----- OpenAI chat completions logs, plain messages, batch files --------------------------
def _request_response(obj: dict) -> tuple[dict, dict]:
    request = next((v for v in (obj.get("request"), obj.get("body")) if isinstance(v, dict) and "messages" in v), obj)
    response = obj.get("response")
    if isinstance(response, dict) and isinstance(response.get("body"), dict):
        response = response["body"]
    if not isinstance(response, dict):
        response = obj if "choices" in obj else {}
    return request, response


def parse_openai_chat(obj: dict) -> list[Parsed]:
    request, response = _request_response(obj)
    flags: set[str] = set()
    if "messages" not in request:
        raise NotAConversation("not_a_conversation", "no request messages")
    messages = _messages(request["messages"], flags, "messages") + _choice_message(response, flags)
    status = _first(_get(obj, "response", "status_code"), obj.get("status_code"), obj.get("status"))
    if obj.get("error") or response.get("error") or (isinstance(status, int) and status >= 400):
        flags.add("error_response")
    return [Parsed(messages, flags=flags, custom_id=_text_or_none(obj.get("custom_id")), **_meta(obj, request, response))]


def batch_output_message(obj: dict) -> tuple[str, dict | None, dict]:
    """(custom_id, assistant message or None on an error, metadata) of a batch output line."""
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise NotAConversation("not_a_conversation", "batch output line without custom_id")
    body = _get(obj, "response", "body")
    status = _get(obj, "response", "status_code")
    flags: set[str] = set()
    if obj.get("error") or not isinstance(body, dict) or (isinstance(status, int) and status >= 400):
        return custom_id, None, {}
    messages = _choice_message(body, flags)
    meta = {"model": _text_or_none(body.get("model")), "timestamp": iso_time(body.get("created"))}
    if flags:
        meta["flags"] = sorted(flags)
    return custom_id, (messages[0] if messages else None), meta


def parse_batch_output(obj: dict) -> list[Parsed]:  # joined by the ingest loop, not parsed alone
    raise NotAConversation("not_a_conversation", "batch output line")


# ----- ShareGPT ----------------------------------------------------------------------------
def parse_sharegpt(obj: dict) -> list[Parsed]:
    turns = obj.get("conversations", obj.get("conversation", obj.get("items")))
    if not isinstance(turns, list):
        raise NotAConversation("not_a_conversation", "no conversations list")
    flags: set[str] = set()
    messages = []
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for turn in turns:
        if not isinstance(turn, dict):
            raise NotAConversation("not_a_conversation", f"turn of type {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        messages.append({"role": norm_role(role), "content": content_text(value, flags)})
    meta = {"model": _text_or_none(obj.get("model")), "timestamp": iso_time(obj.get("timestamp")),
            "tenant": _text_or_none(obj.get("tenant")), "route": _text_or_none(obj.get("route"))}
    return [Parsed(messages, flags=flags, **meta)]


# ----- OpenTelemetry (OTLP JSON) -------------------------------------------------------------
def any_value(value: Any) -> Any:
    """Decode an OTLP JSON AnyValue."""
    if not isinstance(value, dict):
        return value
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        try:
            return int(value["intValue"])
        except (TypeError, ValueError):
            return value["intValue"]
    if "doubleValue" in value:
        return value["doubleValue"]
    if "boolValue" in value:
        return value["boolValue"]
    if "arrayValue" in value:
        return [any_value(v) for v in _items(_get(value, "arrayValue", "values"))]
    if "kvlistValue" in value:
        return attributes(_get(value, "kvlistValue", "values"))
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def attributes(items: Any) -> dict:
    if not isinstance(items, list):
        return {}
    return {kv["key"]: any_value(kv.get("value")) for kv in items if isinstance(kv, dict) and "key" in kv}


def _json_value(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _otel_message(msg: Any, flags: set[str], role: str | None = None) -> dict:
    """A GenAI semconv message: {"role", "parts": [...]} or legacy {"role", "content"}."""
    msg = _json_value(msg)
    if isinstance(msg, str):
        return {"role": role or "user", "content": msg}
    if not isinstance(msg, dict):
        raise NotAConversation("not_a_conversation", "gen_ai message is not an object")
    if "message" in msg and isinstance(msg["message"], dict):  # gen_ai.choice body
        msg = msg["message"]
    if "parts" in msg:
        return {"role": norm_role(msg.get("role") or role or "user"), "content": content_text(msg["parts"], flags)}
    out = openai_message({**msg, "role": msg.get("role") or role or "user"}, flags)
    return out


def _otel_list(value: Any, flags: set[str]) -> list[dict]:
    value = _json_value(value)
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise NotAConversation("not_a_conversation", "gen_ai messages attribute is not a list")
    return [_otel_message(m, flags) for m in value]


def _first_output(msgs: list[dict]) -> list[dict]:
    return msgs[:1]


def _flattened(attrs: dict, prefix: str, flags: set[str]) -> list[dict]:
    """OpenLLMetry style: gen_ai.prompt.0.role / gen_ai.prompt.0.content ..."""
    rx = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)")
    items: dict[int, dict] = {}
    for key, value in attrs.items():
        m = rx.fullmatch(key)
        if m:
            items.setdefault(int(m.group(1)), {})[m.group(2)] = value
    out = []
    for _, item in sorted(items.items()):
        calls = sorted((k, v) for k, v in item.items() if k.startswith("tool_calls."))
        msg: dict = {"role": item.get("role", "assistant" if prefix.endswith("completion") else "user"),
                     "content": _json_value(item.get("content"))}
        names = {k.split(".")[1]: v for k, v in calls if k.endswith(".name")}
        args = {k.split(".")[1]: v for k, v in calls if k.endswith(".arguments")}
        if names:
            msg["tool_calls"] = [{"function": {"name": names[i], "arguments": args.get(i)}} for i in sorted(names)]
        out.append(openai_message(msg, flags))
    return out


EVENT_ROLES = {
    "gen_ai.system.message": "system", "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool",
}


def _span_messages(attrs: dict, events: list[dict], flags: set[str]) -> list[dict]:
    details = next((attributes(e.get("attributes")) for e in events
                    if e.get("name") == "gen_ai.client.inference.operation.details"), {})
    source = attrs if ("gen_ai.input.messages" in attrs or "gen_ai.output.messages" in attrs) else details
    if "gen_ai.input.messages" in source or "gen_ai.output.messages" in source:
        system = _json_value(source.get("gen_ai.system_instructions"))
        msgs = []
        if system:
            parts = system if isinstance(system, list) else [system]
            msgs.append({"role": "system", "content": content_text(parts, flags)})
        msgs += _otel_list(source.get("gen_ai.input.messages"), flags)
        return msgs + _first_output(_otel_list(source.get("gen_ai.output.messages"), flags))
    if any(k.startswith("gen_ai.prompt.") for k in attrs):
        return _flattened(attrs, "gen_ai.prompt", flags) + _first_output(_flattened(attrs, "gen_ai.completion", flags))
    msgs: list[dict] = []
    completions: list[dict] = []
    choices: list[tuple[int, dict]] = []
    for event in events:
        name, eattrs = event.get("name"), attributes(event.get("attributes"))
        if name == "gen_ai.content.prompt":
            msgs += _otel_list(eattrs.get("gen_ai.prompt"), flags)
        elif name == "gen_ai.content.completion":
            completions += _otel_list(eattrs.get("gen_ai.completion"), flags)
        elif name in EVENT_ROLES:
            body = _json_value(eattrs.get("gen_ai.event.content", eattrs.get("content", eattrs.get("body"))))
            if body is None:
                continue
            msgs.append(_otel_message(body, flags, role=EVENT_ROLES[name]) if not isinstance(body, str)
                        else {"role": EVENT_ROLES[name], "content": body})
        elif name == "gen_ai.choice":
            body = _json_value(eattrs.get("gen_ai.event.content", eattrs.get("message", eattrs.get("body"))))
            if body is not None:
                index = body.get("index", 0) if isinstance(body, dict) else 0
                choices.append((index if isinstance(index, int) else 0, _otel_message(body, flags, role="assistant")))
    outputs = completions or [m for _, m in sorted(choices, key=lambda c: c[0])]
    return msgs + _first_output(outputs)


def parse_otlp(obj: dict) -> list[Parsed]:
    resource_spans = obj.get("resourceSpans")
    if not isinstance(resource_spans, list):
        raise NotAConversation("not_a_conversation", "resourceSpans is not a list")
    out: list[Parsed] = []
    genai_spans = 0
    for rs in resource_spans:
        if not isinstance(rs, dict):
            continue
        resource = attributes(_get(rs, "resource", "attributes"))
        for ss in _items(rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans")):
            for span in _items(_get(ss, "spans")):
                if not isinstance(span, dict):
                    continue
                attrs = attributes(span.get("attributes"))
                events = [e for e in _items(span.get("events")) if isinstance(e, dict)]
                if not (any(k.startswith("gen_ai.") for k in attrs)
                        or any(str(e.get("name", "")).startswith("gen_ai.") for e in events)):
                    continue  # not a GenAI span (HTTP, DB, ...)
                genai_spans += 1
                flags: set[str] = set()
                messages = _span_messages(attrs, events, flags)
                if not messages:
                    continue  # content capture was off for this span
                status = _get(span, "status", "code")
                if status in (2, "STATUS_CODE_ERROR") or attrs.get("error.type"):
                    flags.add("error_response")
                out.append(Parsed(
                    messages,
                    sub=f"{span.get('traceId', '')}/{span.get('spanId', '')}",
                    timestamp=iso_time(span.get("startTimeUnixNano")),
                    model=_text_or_none(_first(attrs.get("gen_ai.response.model"), attrs.get("gen_ai.request.model"))),
                    tenant=_text_or_none(_first(attrs.get("tenant.id"), resource.get("tenant.id"), attrs.get("tenant"))),
                    route=_text_or_none(_first(attrs.get("http.route"), attrs.get("url.path"), resource.get("service.name"))),
                    flags=flags,
                ))
    if not out:
        why = ("GenAI spans carry no message content (content capture off?)" if genai_spans
               else "no GenAI (gen_ai.*) spans in this OTLP record")
        raise NotAConversation("not_a_conversation", why)
    return out


# ----- detection ---------------------------------------------------------------------------------
def sniff(obj: Any) -> str | None:
    """The format one parsed record looks like, or None."""
    if not isinstance(obj, dict):
        return None
    if "resourceSpans" in obj:
        return "otlp"
    if "custom_id" in obj:
        if isinstance(obj.get("body"), dict) and "messages" in obj["body"]:
            return "openai-batch-input"
        if "response" in obj or "error" in obj:
            return "openai-batch-output"
    if isinstance(obj.get("conversations"), list) or isinstance(obj.get("conversation"), list):
        return "sharegpt"
    request, response = _request_response(obj)
    if "messages" in request:
        if "choices" in response or "response" in obj or "error" in obj:
            return "openai-chat-log"
        messages = request["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[0], dict) and "from" in messages[0]:
            return "sharegpt"
        return "openai-messages"
    return None


PARSERS: dict[str, Callable[[dict], list[Parsed]]] = {
    "openai-chat-log": parse_openai_chat,
    "openai-messages": parse_openai_chat,
    "openai-batch-input": parse_openai_chat,
    "openai-batch-output": parse_batch_output,
    "sharegpt": parse_sharegpt,
    "otlp": parse_otlp,
}
FAMILY = {"openai-chat-log": "openai", "openai-messages": "openai", "openai-batch-input": "openai"}


def detect(samples: Iterable[Any]) -> str | None:
    """A file's format: the most common shape among its first records."""
    counts = Counter(f for f in (sniff(s) for s in samples) if f)
    if not counts:
        return None
    best = counts.most_common(1)[0][0]
    # A chat log that happens to start with request-only lines is still a chat log.
    if best == "openai-messages" and counts.get("openai-chat-log"):
        return "openai-chat-log"
    return best


def parse(obj: Any, fmt: str) -> list[Parsed]:
    """Parse one record with its file's format; raise NotAConversation with a reason."""
    if not isinstance(obj, dict):
        raise NotAConversation("not_a_conversation", f"JSON {type(obj).__name__}, not an object")
    shape = sniff(obj)
    if shape is None:
        raise NotAConversation("unknown_shape", "JSON object of no known log format (keys: "
                               + ", ".join(sorted(map(str, obj))[:8]) + ")")
    if shape != fmt and FAMILY.get(shape, shape) != FAMILY.get(fmt, fmt):
        raise NotAConversation("format_mismatch", f"a {shape} record in a {fmt} file")
    return PARSERS[fmt](obj)
