"""Log formats -> conversations, including property-based fuzzing of the parsers."""

import json
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drafter.traces.formats import (
    NotAConversation,
    batch_output_message,
    detect,
    iso_time,
    parse,
    sniff,
)


def roles_contents(parsed):
    return [(m["role"], m["content"]) for m in parsed.messages]


# ----- OpenAI chat completions gateway logs ------------------------------------------------------
def gateway_line(**over):
    line = {
        "timestamp": "2026-11-20T10:00:00+01:00",
        "tenant": "acme",
        "route": "/v1/chat/completions",
        "request": {"model": "gpt-x", "temperature": 0.2, "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": "this."}]},
        ]},
        "response": {"model": "gpt-x-0613", "created": 1763632800, "choices": [
            {"index": 1, "message": {"role": "assistant", "content": "second"}, "finish_reason": "length"},
            {"index": 0, "message": {"role": "assistant", "content": "first"}, "finish_reason": "stop"},
        ], "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
    }
    line.update(over)
    return line


def test_gateway_log_content_parts_and_n_choices():
    obj = gateway_line()
    assert sniff(obj) == "openai-chat-log"
    [p] = parse(obj, "openai-chat-log")
    # developer -> system; content parts joined; the choice with index 0 wins, whatever its position
    assert roles_contents(p) == [("system", "Be brief."), ("user", "Describe\nthis."), ("assistant", "first")]
    assert p.model == "gpt-x-0613" and p.tenant == "acme" and p.route == "/v1/chat/completions"
    assert p.timestamp == "2026-11-20T09:00:00Z" and not p.flags


def test_gateway_log_tool_calls_and_tool_messages():
    obj = gateway_line()
    obj["request"]["messages"] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
    ]
    [p] = parse(obj, "openai-chat-log")
    roles = [m["role"] for m in p.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    call = p.messages[1]["content"]
    assert call.startswith("<tool_call>") and json.loads(call.split("\n")[1]) == {
        "name": "get_weather", "arguments": {"city": "Paris"}}


def test_gateway_log_flat_shape_error_and_image_parts():
    flat = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}], "created": 1700000000}
    [p] = parse(flat, detect([flat]))
    assert roles_contents(p) == [("user", "hi"), ("assistant", "hello")] and p.timestamp == "2023-11-14T22:13:20Z"
    failed = {"request": {"messages": [{"role": "user", "content": "hi"}]}, "status": 500, "error": {"message": "x"}}
    [p] = parse(failed, "openai-chat-log")
    assert "error_response" in p.flags
    image = gateway_line()
    image["request"]["messages"][1]["content"].append({"type": "image_url", "image_url": {"url": "http://x/y.png"}})
    [p] = parse(image, "openai-chat-log")
    assert "non_text" in p.flags


def test_plain_messages_and_sharegpt():
    obj = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}]}
    assert sniff(obj) == "openai-messages"
    [p] = parse(obj, "openai-messages")
    assert roles_contents(p) == [("system", "s"), ("user", "u"), ("assistant", "a")]
    share = {"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                          {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
    assert sniff(share) == "sharegpt"
    [p] = parse(share, "sharegpt")
    assert [m["role"] for m in p.messages] == ["user", "assistant", "user", "assistant"]


def test_batch_files():
    inp = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}}
    out = {"id": "batch_req_1", "custom_id": "r1", "response": {"status_code": 200, "request_id": "q", "body": {
        "model": "gpt-x", "created": 1700000000,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}]}}, "error": None}
    err = {"id": "batch_req_2", "custom_id": "r2", "response": None, "error": {"code": "x", "message": "y"}}
    assert sniff(inp) == "openai-batch-input" and sniff(out) == sniff(err) == "openai-batch-output"
    [p] = parse(inp, "openai-batch-input")
    assert p.custom_id == "r1" and roles_contents(p) == [("user", "hi")]
    custom_id, message, meta = batch_output_message(out)
    assert custom_id == "r1" and message == {"role": "assistant", "content": "hello"} and meta["model"] == "gpt-x"
    assert batch_output_message(err)[1] is None


# ----- OpenTelemetry GenAI spans (OTLP JSON) ---------------------------------------------------------
def kv(key, value):
    if isinstance(value, str):
        return {"key": key, "value": {"stringValue": value}}
    return {"key": key, "value": {"intValue": str(value)}}


def otlp(spans, resource=()):
    return {"resourceSpans": [{"resource": {"attributes": list(resource)},
                               "scopeSpans": [{"scope": {"name": "x"}, "spans": spans}]}]}


def span(attrs, events=(), span_id="s1"):
    return {"traceId": "t1", "spanId": span_id, "name": "chat m", "kind": 3, "startTimeUnixNano": "1763632800000000000",
            "attributes": attrs, "events": list(events), "status": {}}


def test_otlp_attributes_current_conventions():
    inputs = [{"role": "user", "parts": [{"type": "text", "content": "Weather?"}]},
              {"role": "assistant", "parts": [{"type": "tool_call", "id": "c", "name": "w", "arguments": {"c": "P"}}]},
              {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c", "response": "sunny"}]}]
    outputs = [{"role": "assistant", "parts": [{"type": "text", "content": "It is sunny."}], "finish_reason": "stop"}]
    obj = otlp([span([kv("gen_ai.operation.name", "chat"), kv("gen_ai.request.model", "m1"),
                      kv("gen_ai.system_instructions", json.dumps([{"type": "text", "content": "Be nice."}])),
                      kv("gen_ai.input.messages", json.dumps(inputs)),
                      kv("gen_ai.output.messages", json.dumps(outputs)), kv("http.route", "/chat")]),
                span([kv("http.method", "GET")], span_id="s2")],  # not a GenAI span: ignored
               resource=[kv("service.name", "svc"), kv("tenant.id", "t-9")])
    assert sniff(obj) == "otlp"
    [p] = parse(obj, "otlp")
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert p.messages[-1]["content"] == "It is sunny." and p.messages[3]["content"] == "sunny"
    assert p.model == "m1" and p.tenant == "t-9" and p.route == "/chat" and p.sub == "t1/s1"
    assert p.timestamp == "2025-11-20T10:00:00Z"


def test_otlp_events_and_flattened_attributes():
    events = [
        {"name": "gen_ai.system.message", "attributes": [kv("gen_ai.event.content", json.dumps({"content": "sys"}))]},
        {"name": "gen_ai.user.message", "attributes": [kv("gen_ai.event.content", json.dumps({"content": "hello"}))]},
        {"name": "gen_ai.choice", "attributes": [kv("gen_ai.event.content", json.dumps(
            {"index": 1, "message": {"content": "other"}}))]},
        {"name": "gen_ai.choice", "attributes": [kv("gen_ai.event.content", json.dumps(
            {"index": 0, "finish_reason": "stop", "message": {"content": "hi!"}}))]},
    ]
    flattened = [kv("gen_ai.system", "openai"), kv("gen_ai.prompt.0.role", "user"), kv("gen_ai.prompt.0.content", "2+2?"),
                 kv("gen_ai.completion.0.role", "assistant"), kv("gen_ai.completion.0.content", "4")]
    legacy = [{"name": "gen_ai.content.prompt", "attributes": [kv("gen_ai.prompt", json.dumps([{"role": "user", "content": "a"}]))]},
              {"name": "gen_ai.content.completion", "attributes": [kv("gen_ai.completion", json.dumps([{"role": "assistant", "content": "b"}]))]}]
    obj = otlp([span([kv("gen_ai.system", "x")], events, "e"), span(flattened, (), "f"),
                span([kv("gen_ai.system", "x")], legacy, "g")])
    a, b, c = parse(obj, "otlp")
    assert roles_contents(a) == [("system", "sys"), ("user", "hello"), ("assistant", "hi!")]
    assert roles_contents(b) == [("user", "2+2?"), ("assistant", "4")]
    assert roles_contents(c) == [("user", "a"), ("assistant", "b")]


def test_otlp_without_content_is_not_a_conversation():
    obj = otlp([span([kv("gen_ai.operation.name", "chat"), kv("gen_ai.usage.input_tokens", 5)])])
    with pytest.raises(NotAConversation, match="content capture"):
        parse(obj, "otlp")


# ----- detection and reasons -------------------------------------------------------------------------
def test_detect_and_reasons():
    chat = gateway_line()
    assert detect([chat, {"x": 1}, chat]) == "openai-chat-log"
    assert detect([{"x": 1}, [1, 2]]) is None
    with pytest.raises(NotAConversation) as exc:
        parse({"x": 1}, "openai-chat-log")
    assert exc.value.reason == "unknown_shape"
    with pytest.raises(NotAConversation) as exc:
        parse({"conversations": []}, "openai-chat-log")
    assert exc.value.reason == "format_mismatch"
    with pytest.raises(NotAConversation) as exc:
        parse(["a"], "sharegpt")
    assert exc.value.reason == "not_a_conversation"
    with pytest.raises(NotAConversation):
        parse({"messages": "hello"}, "openai-messages")


@pytest.mark.parametrize("value, expected", [
    (1700000000, "2023-11-14T22:13:20Z"), (1700000000123, "2023-11-14T22:13:20.123000Z"),
    ("1700000000000000000", "2023-11-14T22:13:20Z"), ("2024-02-03T04:05:06Z", "2024-02-03T04:05:06Z"),
    ("2024-02-03 04:05:06", "2024-02-03T04:05:06"), ("yesterday", None), (None, None), (True, None),
])
def test_iso_time(value, expected):
    assert iso_time(value) == expected


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)), st.sampled_from(
    ["{}Z", "{}z", "{} ", "{}+00:00", "{}-05:00", "{}.5Z"]), st.integers(0, 19), st.sampled_from("0-:T Z9x\u0663"))
@example(datetime(2024, 2, 29, 23, 59, 59), "{}Z", 19, "Z")
@example(datetime(2024, 2, 3, 4, 5, 6), "2024-W05-6T04:05:06Z", 0, "2")  # (a week date, read as 2024-02-03)
@example(datetime(2024, 2, 3, 4, 5, 6), "2024-02-03T040506.1Z", 0, "2")  # (basic time)
def test_iso_time_of_second_precision_utc_strings_takes_the_general_path_result(when, template, at, char):
    """The "YYYY-MM-DDTHH:MM:SSZ" shortcut returns what the general parse returns, for that
    shape, its near misses (one character replaced) and other offsets."""
    text = template.format(when.replace(microsecond=0).isoformat())
    for value in (text, text[:at] + char + text[at + 1 :]):
        try:
            general = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            general = general.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") \
                if general.tzinfo is not None else general.isoformat()
        except ValueError:
            general = None
        assert iso_time(value) == general, value


# ----- fuzzing ----------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)
keys = st.sampled_from(["messages", "request", "response", "choices", "body", "custom_id", "conversations",
                        "resourceSpans", "role", "content", "from", "value", "message", "index", "parts", "type",
                        "text", "tool_calls", "function", "name", "arguments", "scopeSpans", "spans", "attributes",
                        "events", "key", "stringValue", "error", "status"])
shaped = st.recursive(
    st.none() | st.integers() | st.text(max_size=12) | st.sampled_from(["user", "assistant", "human", "gpt", "text"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=40,
)
FORMATS = ["openai-chat-log", "openai-messages", "openai-batch-input", "sharegpt", "otlp"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=st.one_of(json_values, shaped), fmt=st.sampled_from(FORMATS))
@example(obj={"messages": [{"tool_calls": 1}]}, fmt="openai-chat-log")  # found by this test in CI: a TypeError
@example(obj={"resourceSpans": [{"scopeSpans": 1}]}, fmt="otlp")  # and its kin, found by reading the parser
@example(obj={"resourceSpans": [{"scopeSpans": [{"spans": 5}]}]}, fmt="otlp")
@example(obj={"resourceSpans": [{"scopeSpans": [{"spans": [{"events": 3}]}]}]}, fmt="otlp")
@example(obj={"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [
    {"key": "gen_ai.prompt", "value": {"arrayValue": 3}}, {"key": "gen_ai.x", "value": {"kvlistValue": 3}}]}]}]}]},
    fmt="otlp")
def test_fuzz_parse_never_crashes(obj, fmt):
    """Any JSON value either parses into well-typed conversations or raises NotAConversation."""
    try:
        parsed = parse(obj, fmt)
    except NotAConversation as exc:
        assert exc.reason in {"unknown_shape", "not_a_conversation", "format_mismatch"}
        return
    for p in parsed:
        assert isinstance(p.messages, list)
        for m in p.messages:
            assert isinstance(m["role"], str) and isinstance(m["content"], str)
        assert p.timestamp is None or isinstance(p.timestamp, str)
        for value in (p.model, p.tenant, p.route):
            assert value is None or isinstance(value, str)


@settings(max_examples=200, deadline=None)
@given(obj=shaped)
def test_fuzz_sniffed_format_and_batch_output(obj):
    fmt = sniff(obj)
    assert fmt is None or fmt in FORMATS + ["openai-batch-output"]
    if isinstance(obj, dict):
        try:
            custom_id, message, meta = batch_output_message(obj)
        except NotAConversation:
            return
        assert isinstance(custom_id, str) and (message is None or isinstance(message["content"], str))


texts = st.text(min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(turns=st.lists(st.tuples(texts, texts), min_size=1, max_size=4), parts=st.booleans())
def test_fuzz_roundtrip_openai_and_sharegpt(turns, parts):
    """Generated valid conversations come back with exactly their text and roles."""
    messages = []
    for user, assistant in turns:
        content = [{"type": "text", "text": user}] if parts else user
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": assistant}]
    [p] = parse({"messages": messages}, "openai-messages")
    assert roles_contents(p) == [(r, t) for u, a in turns for r, t in (("user", u), ("assistant", a))]
    share = {"conversations": [{"from": f, "value": t} for u, a in turns for f, t in (("human", u), ("gpt", a))]}
    [q] = parse(share, "sharegpt")
    assert roles_contents(q) == roles_contents(p)


def test_conversation_row_is_the_models_row():
    # The fast path builds the row without pydantic only when the model would just copy it.
    import pydantic

    from drafter.traces.schema import Conversation, conversation_row

    class Text(str):
        pass

    base = dict(id="abc", source="/logs/a.jsonl", line=3, timestamp="2026-01-01T00:00:00Z", model="m",
                tenant=None, route="/v1/chat/completions", domain="code",
                messages=[{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": ""}])
    cases = [
        base,
        {**base, "timestamp": None, "model": None, "route": None},
        {k: v for k, v in base.items() if k not in ("timestamp", "domain")},  # defaults
        {**base, "line": True}, {**base, "line": "3"},  # bool, str -> int through the model
        {**base, "id": Text("abc")},  # str subclass -> str through the model
        {**base, "messages": [{"content": "x", "role": "user"}]},  # key order of the model
    ]
    for fields in cases:
        row = conversation_row(**fields)
        assert row == Conversation(**fields).row()
        assert list(row) == list(Conversation(**fields).row())
        assert [list(m) for m in row["messages"]] == [["role", "content"]] * len(row["messages"])
        assert type(row["line"]) is int and type(row["id"]) is str
    with pytest.raises(TypeError):
        conversation_row(**base, extra=1)  # no field the model does not have
    for bad in ({**base, "line": 0}, {**base, "domain": "poetry"}, {**base, "domain": None},
                {**base, "messages": [{"role": "narrator", "content": "x"}]},
                {**base, "messages": [{"role": "user", "content": "x", "name": "n"}]},
                {**base, "messages": [{"role": "user", "content": 5}]}, {**base, "model": 7}):
        with pytest.raises(pydantic.ValidationError):
            conversation_row(**bad)


VALUES = st.sampled_from([None, "", 0, False, "x", "2025-01-01T00:00:00Z", "1700000000", 1.5, 1700000000123, [], {}])


@given(obj=st.dictionaries(st.sampled_from(["timestamp", "@timestamp", "time", "created_at", "startTime", "start_time",
                                            "model", "tenant", "tenant_id", "organization", "team_id", "route",
                                            "endpoint", "path", "url", "model_group"]), VALUES),
       meta=st.dictionaries(st.sampled_from(["tenant", "tenant_id", "team_id", "route"]), VALUES),
       response=st.dictionaries(st.sampled_from(["created", "model"]), VALUES),
       request=st.dictionaries(st.just("model"), VALUES))
@settings(max_examples=300, deadline=None)
def test_meta_reads_its_places_in_order(obj, meta, response, request):
    # _meta reads each place only until a value is found: the same as taking the first of all.
    from drafter.traces.formats import _first, _meta, _text_or_none, iso_time

    obj = {**obj, "metadata": meta}
    want = {
        "timestamp": iso_time(_first(obj.get("timestamp"), obj.get("@timestamp"), obj.get("time"), obj.get("created_at"),
                                     obj.get("startTime"), obj.get("start_time"), response.get("created"))),
        "model": _text_or_none(_first(response.get("model"), request.get("model"), obj.get("model"))),
        "tenant": _text_or_none(_first(obj.get("tenant"), obj.get("tenant_id"), meta.get("tenant"), meta.get("tenant_id"),
                                       obj.get("organization"), obj.get("team_id"), meta.get("team_id"))),
        "route": _text_or_none(_first(obj.get("route"), obj.get("endpoint"), obj.get("path"), obj.get("url"),
                                      meta.get("route"), obj.get("model_group"))),
    }
    assert _meta(obj, request, response) == want


def test_record_id_from_a_known_sha256_is_the_same():
    import hashlib

    from drafter.traces.schema import record_id

    raw = b'{"messages": [{"role": "user", "content": "hi"}]}'
    digest = hashlib.sha256(raw).hexdigest()
    assert record_id(raw, "", digest) == record_id(raw) == digest[:16]
    assert record_id(raw, "span-2", digest) == record_id(raw, "span-2") != record_id(raw)
