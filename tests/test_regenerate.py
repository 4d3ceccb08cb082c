"""Regeneration: turn-by-turn answers, both backends, resume, errors and accounting."""

import json
import threading
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from drafter import chat
from drafter.regenerate import (
    LocalBackend,
    OpenAIBackend,
    RegenerateError,
    read_jsonl,
    regenerate,
    retry_after_seconds,
)
from tests.regen_data import conversation, make_rows, write_ingested


def config(tiny_config, **regen):
    regen = {"max_new_tokens": 4, **regen}  # tiny random targets: short answers keep tests fast
    return tiny_config.model_copy(update={"regenerate": tiny_config.regenerate.model_copy(update=regen)})


@pytest.fixture
def ingested(tmp_path):
    train = make_rows(7) + [
        {**conversation(50), "messages": [{"role": "user", "content": "no answer logged"}]},
        {**conversation(51), "messages": [{"role": "assistant", "content": "Hello! How can I help?"},
                                          {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    ]
    return write_ingested(tmp_path / "ingested", train, make_rows(2, start=100))


def by_id(path):
    return {r["id"]: r for r in read_jsonl(path)}


def test_local_regenerates_turn_by_turn(tiny_config, tiny_target, ingested, tmp_path, monkeypatch):
    cfg = config(tiny_config, limit=None)
    prompts = []
    original = LocalBackend.generate

    def spy(self, batch):
        prompts.extend(batch)
        return original(self, batch)

    monkeypatch.setattr(LocalBackend, "generate", spy)
    manifest = regenerate(cfg, ingested, tmp_path / "out", target=tiny_target)

    c = manifest.counts["train"]
    assert (c["input"], c["succeeded"], c["errors"], c["skipped"]) == (9, 7, 0, 2)
    assert c["skipped_by_reason"] == {"no assistant turn": 1, "assistant turn before any user turn": 1}
    assert manifest.counts["holdout"]["succeeded"] == 2
    records = by_id(tmp_path / "out" / "train.jsonl")
    source = {r["id"]: r for r in make_rows(7)}
    assert list(records) == [r["id"] for r in make_rows(7)]  # input order
    for cid, rec in records.items():
        orig = [m for m in source[cid]["messages"]]
        last = max(i for i, m in enumerate(orig) if m["role"] == "assistant")
        orig = orig[: last + 1]  # a trailing user turn has nothing to imitate
        assert [m["role"] for m in rec["messages"]] == [m["role"] for m in orig]
        for new, old in zip(rec["messages"], orig):
            if old["role"] == "assistant":
                assert "original answer" not in new["content"]
            else:
                assert new == old  # system prompts and user turns stay
        n_turns = sum(m["role"] == "assistant" for m in orig)
        assert len(rec["regen"]["finish_reasons"]) == n_turns
        assert rec["regen"]["backend"] == "local" and rec["regen"]["model"] == tiny_target.name
        assert rec["regen"]["params"]["temperature"] == 0.7
        assert rec["tenant"] == "acme" and rec["domain"] == source[cid]["domain"]
    # Second turns are conditioned on the regenerated first answer, not the logged one.
    two_turn = next(r for r in records.values() if len(r["regen"]["finish_reasons"]) == 2)
    second_prompt = chat.prompt_ids(tiny_target.tokenizer, two_turn["messages"][:-1])
    assert second_prompt in prompts
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert not (tmp_path / "out" / ".partial").exists()
    assert read_jsonl(tmp_path / "out" / "errors.jsonl") == []


def test_rerun_is_a_noop(tiny_config, tiny_target, ingested, tmp_path, monkeypatch):
    cfg = config(tiny_config, limit=3)
    first = regenerate(cfg, ingested, tmp_path / "out", target=tiny_target)
    assert first.counts["train"]["skipped_by_reason"]["limit"] == 6
    monkeypatch.setattr(LocalBackend, "generate", lambda *a: pytest.fail("regenerated again"))
    assert regenerate(cfg, ingested, tmp_path / "out", target=tiny_target) == first


def test_raising_the_limit_keeps_finished_records(tiny_config, tiny_target, ingested, tmp_path):
    out = tmp_path / "out"
    regenerate(config(tiny_config, limit=2), ingested, out, target=tiny_target)
    before = by_id(out / "train.jsonl")
    manifest = regenerate(config(tiny_config, limit=None), ingested, out, target=tiny_target)
    after = by_id(out / "train.jsonl")
    assert manifest.counts["train"]["succeeded"] == 7
    assert all(after[cid] == rec for cid, rec in before.items())  # not generated twice


def test_batched_left_padding_matches_one_at_a_time(tiny_config, tiny_target):
    backend = LocalBackend(config(tiny_config, temperature=0.0, max_new_tokens=6).regenerate, tiny_target)
    tok = tiny_target.tokenizer
    prompts = [chat.prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("Hi", "What is 17 times 3?",
                                                                              "Explain binary search in detail.")]
    assert len({len(p) for p in prompts}) == 3
    batched = backend.generate(prompts)
    single = [backend.generate([p])[0] for p in prompts]
    assert [t.text for t in batched] == [t.text for t in single]
    assert all(t.tokens == 6 and t.finish_reason == "length" for t in batched)


def test_continuous_batching_matches_one_at_a_time(tiny_config, tiny_target, ingested, tmp_path):
    """transformers' continuous batching (paged attention, finished rows refilled): greedy
    answers equal the static backend's one prompt at a time, and a whole regeneration run
    through it keeps every conversation."""
    static = LocalBackend(config(tiny_config, temperature=0.0, max_new_tokens=6).regenerate, tiny_target)
    cont = LocalBackend(config(tiny_config, temperature=0.0, max_new_tokens=6, batching="continuous").regenerate,
                        tiny_target)
    tok = tiny_target.tokenizer
    prompts = [chat.prompt_ids(tok, [{"role": "user", "content": q}])
               for q in ("Hi", "What is 17 times 3?", "Explain binary search in detail.", "Name a prime.")]
    single = [static.generate([p])[0] for p in prompts]
    together = cont.generate(prompts)
    assert [(t.text, t.tokens, t.finish_reason) for t in together] == [
        (t.text, t.tokens, t.finish_reason) for t in single]
    assert cont.params()["batching"] == "continuous" and "batching" not in static.params()
    manifest = regenerate(config(tiny_config, limit=None, batching="continuous"), ingested, tmp_path / "out",
                          target=tiny_target)
    assert manifest.counts["train"]["succeeded"] == 7 and manifest.counts["train"]["errors"] == 0


def test_stop_on_eos_reports_finish_reason(tiny_config, tiny_target):
    """An answer ends at its first end token (counted, not in its text); one that meets none stops
    at the budget. The end token is one the greedy answer reaches, told to the backend."""
    cfg = config(tiny_config, temperature=0.0, max_new_tokens=8).regenerate
    prompts = [[5, 6, 7], [8, 9]]
    probe = LocalBackend(cfg, tiny_target)
    probe.eos = []  # no end token: both answers run to the budget
    first, second = (g.tokens for g in probe.engine.generate_batch(prompts, 8))
    j = next(j for j, t in enumerate(first) if t not in first[:j] and t not in second)
    backend = LocalBackend(cfg, tiny_target)
    backend.eos = [first[j]]
    stop, length = backend.generate(prompts)
    assert (stop.finish_reason, stop.tokens) == ("stop", j + 1)
    assert stop.text == tiny_target.tokenizer.decode(first[:j], skip_special_tokens=True)
    assert (length.finish_reason, length.tokens) == ("length", 8)


def test_killed_run_resumes_without_loss_or_duplicates(tiny_config, tiny_target, ingested, tmp_path, monkeypatch):
    cfg = config(tiny_config, limit=None, batch_size=1)
    out = tmp_path / "out"
    original = LocalBackend.generate
    calls = {"n": 0}

    def dies(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the run is killed mid-way
        return original(self, batch)

    monkeypatch.setattr(LocalBackend, "generate", dies)
    with pytest.raises(KeyboardInterrupt):
        regenerate(cfg, ingested, out, target=tiny_target)
    partial = out / ".partial" / "train.jsonl"
    first = by_id(partial)
    assert 0 < len(first) < 7 and not (out / "manifest.json").exists()
    with partial.open("a") as f:
        f.write('{"id": "conv-0006", "messages": [{"ro')  # killed while writing a line

    monkeypatch.setattr(LocalBackend, "generate", original)
    manifest = regenerate(cfg, ingested, out, target=tiny_target)
    ids = [r["id"] for r in read_jsonl(out / "train.jsonl")]
    assert ids == [r["id"] for r in make_rows(7)]  # every conversation exactly once, in order
    final = by_id(out / "train.jsonl")
    assert all(final[cid] == rec for cid, rec in first.items())  # finished ones were not redone
    assert manifest.counts["train"]["succeeded"] == 7


def test_failures_go_to_errors_and_are_retried(tiny_config, tiny_target, ingested, tmp_path, monkeypatch):
    cfg = config(tiny_config, limit=None, batch_size=4)
    out = tmp_path / "out"
    original = LocalBackend.generate
    bad = chat.prompt_ids(tiny_target.tokenizer, make_rows(7)[2]["messages"][:2])

    def flaky(self, batch):
        if bad in batch:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, batch)

    monkeypatch.setattr(LocalBackend, "generate", flaky)
    manifest = regenerate(cfg, ingested, out, target=tiny_target)
    c = manifest.counts["train"]
    assert (c["succeeded"], c["errors"], c["skipped"]) == (6, 1, 2)
    errors = read_jsonl(out / "errors.jsonl")
    assert [(e["split"], e["id"]) for e in errors] == [("train", "conv-0002")]
    assert "out of memory" in errors[0]["reason"]

    monkeypatch.setattr(LocalBackend, "generate", original)
    manifest = regenerate(cfg, ingested, out, target=tiny_target)  # errors are retried
    assert manifest.counts["train"]["errors"] == 0
    assert [r["id"] for r in read_jsonl(out / "train.jsonl")] == [r["id"] for r in make_rows(7)]
    assert read_jsonl(out / "errors.jsonl") == []


def test_too_long_prompt_is_an_error_not_a_crash(tiny_config, tiny_target, tmp_path):
    long = {**conversation(0), "messages": [{"role": "user", "content": "word " * 5000},
                                            {"role": "assistant", "content": "x"}]}
    ingested = write_ingested(tmp_path / "in", [long, conversation(1)], [conversation(2)])
    manifest = regenerate(config(tiny_config, limit=None), ingested, tmp_path / "out", target=tiny_target)
    assert manifest.counts["train"]["errors"] == 1
    assert "exceeds the target's context" in read_jsonl(tmp_path / "out" / "errors.jsonl")[0]["reason"]


def test_changed_parameters_discard_partial_work(tiny_config, tiny_target, ingested, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = LocalBackend.generate
    monkeypatch.setattr(LocalBackend, "generate",
                        lambda self, b: (_ for _ in ()).throw(KeyboardInterrupt) if len(b) == 1 else original(self, b))
    with pytest.raises(KeyboardInterrupt):
        regenerate(config(tiny_config, limit=None, batch_size=1), ingested, out, target=tiny_target)
    monkeypatch.setattr(LocalBackend, "generate", original)
    manifest = regenerate(config(tiny_config, limit=None, temperature=0.0), ingested, out, target=tiny_target)
    assert all(r["regen"]["params"]["temperature"] == 0.0 for r in read_jsonl(out / "train.jsonl"))
    assert manifest.params["temperature"] == 0.0


def test_the_sampler_is_part_of_the_run(tiny_config, tiny_target, ingested, tmp_path):
    """transformers' warpers (continuous batching) and the engine's Sampler (static batches) break
    ties at the top-p cut differently and draw from other random streams: a run of one is not
    resumed or reused by the other, greedy or not."""
    out = tmp_path / "out"
    first = regenerate(config(tiny_config, limit=None, batching="continuous"), ingested, out, target=tiny_target)
    second = regenerate(config(tiny_config, limit=None), ingested, out, target=tiny_target)
    assert "sampler" not in first.params and second.params["sampler"] == "drafter.decoding.SpecEngine"
    assert second.params["run_key"] != first.params["run_key"]
    greedy = {b: regenerate(config(tiny_config, limit=None, temperature=0.0, batching=b), ingested, out / b,
                            target=tiny_target) for b in ("static", "continuous")}
    assert greedy["static"].params["sampler"] == "drafter.decoding.SpecEngine" and "sampler" not in greedy["continuous"].params
    assert greedy["static"].params["run_key"] != greedy["continuous"].params["run_key"]


def test_missing_input_is_a_clear_error(tiny_config, tiny_target, tmp_path):
    with pytest.raises(RegenerateError, match="run ingest first"):
        regenerate(tiny_config, tmp_path / "nothing", tmp_path / "out", target=tiny_target)


# ----- the OpenAI-compatible client against a scripted HTTP server ---------------------
class Scripted(BaseHTTPRequestHandler):
    script: list = []
    seen: list = []
    auth: list = []  # the Authorization header of every request (None when absent)

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).auth.append(self.headers.get("authorization"))
        data = json.dumps({"data": [{"id": "served-model"}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append((time.monotonic(), body))
        type(self).auth.append(self.headers.get("authorization"))
        action = type(self).script.pop(0) if type(self).script else ("ok",)
        if action[0] == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if action[0] == "bad-gzip":  # a body that cannot be decoded: httpx.DecodingError
            self.send_response(200)
            self.send_header("content-encoding", "gzip")
            self.send_header("content-length", "12")
            self.end_headers()
            self.wfile.write(b"not gzipped!")
            return
        if action[0] == "trickle":  # headers at once, then a byte at a time: no read ever times out
            self.send_response(200)
            self.send_header("content-length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass  # the client gave up
            return
        if action[0] == "ok":
            last = body["messages"][-1]["content"]
            code, headers = 200, {}
            payload = {"choices": [{"message": {"role": "assistant", "content": f"echo: {last}"},
                                    "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
        else:
            _, code, headers, payload = action
        data = json.dumps(payload).encode()
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    Scripted.script, Scripted.seen, Scripted.auth = [], [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def openai_cfg(tiny_config, url, **kw):
    return config(tiny_config, backend="openai", base_url=url, model="m", backoff_base_s=0.01,
                  backoff_max_s=0.05, **kw)


def test_retries_honour_retry_after_and_back_off(tiny_config, server):
    Scripted.script = [
        ("status", 429, {"Retry-After": "0.3"}, {"error": "slow down"}),
        ("status", 503, {}, {"error": "overloaded"}),
        ("drop",),
        ("ok",),
    ]
    backend = OpenAIBackend(openai_cfg(tiny_config, server).regenerate)

    import asyncio

    import httpx

    async def one():
        async with httpx.AsyncClient() as client:
            return await backend.complete(client, [{"role": "user", "content": "hi"}])

    turn = asyncio.run(one())
    assert turn.text == "echo: hi" and turn.tokens == 3 and backend.retries == 3
    times = [t for t, _ in Scripted.seen]
    assert len(times) == 4 and times[1] - times[0] >= 0.3  # waited as the server asked
    body = Scripted.seen[0][1]
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (0.7, 0.8, 20, 4)
    assert body["chat_template_kwargs"] == {"enable_thinking": False}


def test_gives_up_after_max_retries_and_records_the_error(tiny_config, server, tmp_path):
    Scripted.script = [("status", 500, {}, {"error": "boom"})] * 3 + [("status", 404, {}, {"error": "no model"})]
    ingested = write_ingested(tmp_path / "in", [conversation(0), conversation(1)], [conversation(2)])
    cfg = openai_cfg(tiny_config, server, max_retries=2, concurrency=1, limit=None)
    manifest = regenerate(cfg, ingested, tmp_path / "out")
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert [e["id"] for e in errors] == ["conv-0000", "conv-0001"]
    assert "gave up after 3 attempts" in errors[0]["reason"] and "HTTP 500" in errors[0]["reason"]
    assert "HTTP 404" in errors[1]["reason"]  # not retryable: failed at once
    assert len(Scripted.seen) == 5  # 3 tries + 1 for train, then the holdout conversation
    c = manifest.counts["train"]
    assert (c["succeeded"], c["errors"], c["skipped"]) == (0, 2, 0)
    # The next run retries them; the server is healthy now.
    manifest = regenerate(cfg, ingested, tmp_path / "out")
    assert manifest.counts["train"]["succeeded"] == 2


def test_fields_a_server_refuses_are_dropped_once(tiny_config, server, tmp_path):
    Scripted.script = [("status", 422, {}, {"detail": "Unexpected fields in the request: {'top_k'}"})]
    ingested = write_ingested(tmp_path / "in", make_rows(4), make_rows(1, start=10))
    manifest = regenerate(openai_cfg(tiny_config, server, concurrency=3, limit=None), ingested, tmp_path / "out")
    assert manifest.counts["train"]["succeeded"] == 4
    assert "top_k" not in Scripted.seen[-1][1]
    assert manifest.params["top_k"] is None  # the record says top-k was not applied
    rec = read_jsonl(tmp_path / "out" / "train.jsonl")[1]  # a two-turn conversation
    assert [m["content"] for m in rec["messages"] if m["role"] == "assistant"] == [
        f"echo: {rec['messages'][0]['content']}", f"echo: {rec['messages'][2]['content']}"]


def test_retry_after_formats():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_seconds(later) <= 31


def test_unreachable_server_without_model_name_is_clear(tiny_config):
    cfg = config(tiny_config, backend="openai", base_url="http://127.0.0.1:9/v1", timeout_s=2)
    with pytest.raises(RegenerateError, match="regenerate.model"):
        OpenAIBackend(cfg.regenerate)


# ----- credentials: the key goes to its own host only, never in clear text off this machine ------
KEY = "sk-test-secret-0123456789"


def _run_one(cfg, tmp_path):
    ingested = write_ingested(tmp_path / "in", [conversation(0)], [conversation(2)])
    return regenerate(cfg, ingested, tmp_path / "out")


@pytest.mark.parametrize("host, sent", [
    (None, False),                # no host named: the key stays home
    ("api.example.com", False),   # the key is for another host
    ("127.0.0.1", True),
    ("127.0.0.1:{port}", True),
    ("127.0.0.1:1", False),       # same machine, another port: another server
])
def test_api_key_goes_only_to_its_configured_host(tiny_config, server, tmp_path, monkeypatch, host, sent):
    monkeypatch.setenv("DRAFTER_TEST_API_KEY", KEY)
    port = server.rsplit(":", 1)[1].split("/")[0]
    cfg = config(tiny_config, backend="openai", base_url=server, model=None, limit=None,
                 api_key_env="DRAFTER_TEST_API_KEY", api_key_host=host and host.format(port=port))
    manifest = _run_one(cfg, tmp_path)
    assert manifest.counts["train"]["succeeded"] == 1 and manifest.params["model"] == "served-model"
    assert len(Scripted.auth) == 3  # GET /models, then one completion per split
    assert Scripted.auth == [f"Bearer {KEY}" if sent else None] * 3


def test_unauthorized_hints_at_the_key_host(tiny_config, server, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTER_TEST_API_KEY", KEY)
    Scripted.script = [("status", 401, {}, {"error": "missing api key"})]
    cfg = openai_cfg(tiny_config, server, api_key_env="DRAFTER_TEST_API_KEY", limit=None)
    _run_one(cfg, tmp_path)
    reason = read_jsonl(tmp_path / "out" / "errors.jsonl")[0]["reason"]
    assert "HTTP 401" in reason and "regenerate.api_key_host" in reason


def test_api_key_is_never_sent_in_clear_text_off_this_machine(tiny_config, monkeypatch):
    monkeypatch.setenv("DRAFTER_TEST_API_KEY", KEY)
    remote = dict(backend="openai", model="m", api_key_env="DRAFTER_TEST_API_KEY", api_key_host="192.0.2.10")
    with pytest.raises(RegenerateError, match="plain http"):
        OpenAIBackend(config(tiny_config, base_url="http://192.0.2.10:8000/v1", **remote).regenerate)
    backend = OpenAIBackend(config(tiny_config, base_url="https://192.0.2.10/v1", **remote).regenerate)
    assert backend.headers == {"Authorization": f"Bearer {KEY}"}  # https to its host: sent
    # Credentials written into the URL are the same secret: refused over plain http too.
    with pytest.raises(RegenerateError, match="plain http"):
        OpenAIBackend(config(tiny_config, backend="openai", model="m",
                             base_url="http://bob:hunter2@192.0.2.10/v1").regenerate)
    # Nothing secret to send: plain http to another machine is the user's choice.
    monkeypatch.delenv("DRAFTER_TEST_API_KEY")
    assert OpenAIBackend(config(tiny_config, base_url="http://192.0.2.10:8000/v1", **remote).regenerate).headers == {}


def test_credentials_in_the_base_url_are_not_recorded(tiny_config, server, tmp_path):
    url = server.replace("http://", "http://bob:hunter2@")
    manifest = _run_one(openai_cfg(tiny_config, url, limit=None), tmp_path)
    assert manifest.counts["train"]["succeeded"] == 1
    assert manifest.params["base_url"] == server.replace("http://", "http://REDACTED@")
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"manifest.json", "train.jsonl", "config.yaml"}
    for path in written:
        assert b"hunter2" not in path.read_bytes(), path


# ----- transport failures: retried like any transient failure, then recorded -------------------
def test_undecodable_and_stalled_responses_are_retried_then_recorded(tiny_config, server, tmp_path):
    Scripted.script = [("bad-gzip",), ("trickle",), ("ok",),  # conv-0000: two failures, then an answer
                       ("drop",), ("trickle",), ("bad-gzip",)]  # conv-0002: fails every attempt
    ingested = write_ingested(tmp_path / "in", [conversation(0), conversation(2)], [conversation(3)])
    cfg = openai_cfg(tiny_config, server, max_retries=2, concurrency=1, timeout_s=0.5, limit=None)
    start = time.monotonic()
    manifest = regenerate(cfg, ingested, tmp_path / "out")
    assert time.monotonic() - start < 8  # each 10 s trickle was cut off at the request's timeout
    c = manifest.counts["train"]
    assert (c["input"], c["succeeded"], c["errors"]) == (2, 1, 1)
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert [e["id"] for e in errors] == ["conv-0002"]
    assert "gave up after 3 attempts" in errors[0]["reason"] and "DecodingError" in errors[0]["reason"]
    assert manifest.counts["holdout"]["succeeded"] == 1
    assert manifest.throughput["retries"] == 4
    assert len(Scripted.seen) == 7


def test_an_unexpected_error_fails_its_conversation_not_the_run(tiny_config, server, tmp_path, monkeypatch):
    original = OpenAIBackend._parse
    calls = {"n": 0}

    def parse(resp):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("unexpected")
        return original(resp)

    monkeypatch.setattr(OpenAIBackend, "_parse", staticmethod(parse))
    ingested = write_ingested(tmp_path / "in", [conversation(0), conversation(1), conversation(2)],
                              [conversation(3)])
    manifest = regenerate(openai_cfg(tiny_config, server, concurrency=2, limit=None), ingested, tmp_path / "out")
    c = manifest.counts["train"]
    assert (c["succeeded"], c["errors"]) == (2, 1)
    assert "RuntimeError: unexpected" in read_jsonl(tmp_path / "out" / "errors.jsonl")[0]["reason"]
    assert manifest.counts["holdout"]["succeeded"] == 1
