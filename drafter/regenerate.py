"""Regenerate every assistant turn with the target's own answer, turn by turn.

A drafter must imitate the target as it is served, so each assistant message of the
ingested conversations is replaced by what the target answers given the *regenerated*
history (ALGORITHMS.md section 7). System, user and tool messages stay as they are;
messages after the last assistant turn are dropped (nothing to imitate there).

Two backends give the same records:
- `local`: the target on this machine, batched with left padding, prompts sorted by length
  to cut padding. Conversations at different turns share a batch, so a multi-turn
  conversation does not hold up the others. Static batches run on the decoding engine
  (`drafter.decoding.SpecEngine` without a drafter: finished rows leave the batch, top-k +
  top-p and the draw through `drafter.sampling.Sampler`, prompts prefilled packed: 1.55x
  transformers' `generate` at 16 rows); continuous batching is transformers' `generate_batch`.
- `openai`: any OpenAI-compatible server (vLLM, SGLang, `transformers serve`): asyncio
  with `concurrency` requests in flight, a timeout per request (the whole request, not
  each read), retries with exponential backoff and jitter on 429, 5xx, timeouts, connection
  and protocol errors and undecodable bodies, honouring Retry-After. Any other failure
  fails that conversation alone (recorded in the error file); no worker dies. The API key
  (`$<api_key_env>`) goes only to `regenerate.api_key_host`, and only over https unless
  that host is this machine; URL credentials are never written to records or manifests.

Resumable: finished conversations are appended to `.partial/<split>.jsonl` as they
complete; a killed run reads them back (a half-written last line is cut off) and only
does the rest. Failures are appended to `.partial/errors.jsonl` and retried by the next
run. When a run ends, the outputs are written in input order (atomically), with
`errors.jsonl`, `manifest.json` (succeeded + errors + skipped = input, per split) and
`config.yaml`.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import torch

from drafter import chat
from drafter.config import Config, RegenerateConfig
from drafter.errors import DrafterError
from drafter.progress import StageProgress
from drafter.runtime import dtype_name
from drafter.manifest import (
    Timer,
    atomic_write_text,
    check_accounting,
    read_manifest,
    redact_url,
    sha256_file,
    sha256_json,
    sha256_tree,
    write_manifest,
)
from drafter.reports import Manifest

log = logging.getLogger(__name__)

SPLITS = ("train", "holdout")
RETRY_STATUS = {408, 429}  # plus every 5xx
# Request fields beyond the OpenAI standard; dropped (once, with a warning) if a server rejects them.
OPTIONAL_FIELDS = ("top_k", "chat_template_kwargs")


class RegenerateError(DrafterError, RuntimeError):
    """Regeneration cannot run (bad input, unreachable server, no chat template)."""


class RequestFailed(DrafterError, RuntimeError):
    """One generation request failed for good (after retries where they make sense)."""


# ----- one conversation, answered turn by turn -------------------------------------
@dataclass
class Turn:
    text: str
    finish_reason: str  # "stop" | "length" | what the server says
    tokens: int | None  # generated tokens, None when the server does not say


@dataclass
class Conversation:
    """A conversation being regenerated: the history so far and the turns still to answer."""

    row: dict[str, Any]
    source: list[dict]  # messages up to the last assistant turn
    out: list[dict] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    pos: int = 0
    error: str | None = None
    prompt_ids: list[int] | None = None  # local backend: cached until the turn is answered

    @property
    def id(self) -> str:
        return str(self.row["id"])

    def history(self) -> list[dict] | None:
        """The messages to answer next (ending before an assistant turn), or None when done."""
        while self.pos < len(self.source) and self.source[self.pos]["role"] != "assistant":
            message = self.source[self.pos]
            self.out.append({"role": message["role"], "content": message["content"]})
            self.pos += 1
        return None if self.pos >= len(self.source) else self.out

    def answer(self, turn: Turn) -> None:
        self.out.append({"role": "assistant", "content": turn.text})
        self.turns.append(turn)
        self.pos += 1
        self.prompt_ids = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.history() is None


def plan(row: dict[str, Any]) -> list[dict] | str:
    """The messages to regenerate (up to the last assistant turn), or the reason to skip."""
    messages = [m for m in row.get("messages") or [] if m]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return "no assistant turn"
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages))
    if any(m.get("role") == "assistant" for m in messages[:first_user]):
        return "assistant turn before any user turn"  # nothing to condition the answer on
    return [{"role": m["role"], "content": m.get("content") or ""} for m in messages[: last + 1]]


Done = Callable[[Conversation], None]


class Backend:
    name: str
    model: str

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, conversations: Iterable[Conversation], done: Done) -> None:
        """Answer every turn of every conversation; call `done` once for each (error set on failure)."""
        raise NotImplementedError


def _sampling(cfg: RegenerateConfig) -> dict[str, Any]:
    return {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens,
        "enable_thinking": cfg.enable_thinking,
    }


# ----- local: transformers generate ------------------------------------------------
class LocalBackend(Backend):
    name = "local"

    def __init__(self, cfg: RegenerateConfig, target) -> None:
        if target.tokenizer is None:
            raise RegenerateError("the local backend needs a target with a tokenizer")
        self.cfg = cfg
        self.target = target
        self.model = target.name
        self.tokenizer = target.tokenizer
        self.eos = target.eos_token_ids
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.max_positions = getattr(target.config, "max_position_embeddings", None)
        chat.render(self.tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)

    def params(self) -> dict[str, Any]:
        # "batching" only when not the default, so that runs made before the option keep their key.
        return {**_sampling(self.cfg), "batch_size": self.cfg.batch_size,
                **({"batching": self.cfg.batching} if self.cfg.batching != "static" else {}),
                **({"sampler": self.sampler} if self.sampler != "transformers" else {}),
                "target_fingerprint": self.target.fingerprint, "dtype": dtype_name(self.target.dtype)}

    def _prepare(self, conv: Conversation) -> None:
        if conv.prompt_ids is not None:
            return
        try:
            conv.prompt_ids = chat.prompt_ids(self.tokenizer, conv.history(), self.cfg.enable_thinking)
        except DrafterError as exc:
            conv.error = str(exc)
            return
        need = len(conv.prompt_ids) + self.cfg.max_new_tokens
        if self.max_positions and need > self.max_positions:
            conv.error = (
                f"prompt of {len(conv.prompt_ids)} tokens + max_new_tokens {self.cfg.max_new_tokens} "
                f"exceeds the target's context of {self.max_positions}"
            )

    def _generate_kwargs(self) -> dict[str, Any]:
        """The sampling arguments of transformers' generate (greedy when temperature is 0)."""
        cfg = self.cfg
        if cfg.temperature > 0:
            return {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k or None}
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}

    @property
    def sampler(self) -> str:
        """Who decodes and draws: the engine's `Sampler` keeps every token tied at the top-p cut
        (transformers' warpers keep some at random) and draws among the survivors with its own
        generator, so the two are not interchangeable in a run."""
        return "drafter.decoding.SpecEngine" if self.cfg.batching == "static" else "transformers"

    @cached_property
    def engine(self):
        from drafter.decoding import SpecEngine

        cfg = self.cfg
        return SpecEngine(self.target, None, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          eos_token_ids=self.eos)

    def generate(self, prompts: list[list[int]]) -> list[Turn]:
        """Answer `prompts` (in order): one left-padded batch on the engine, or continuous batching."""
        if self.cfg.batching == "continuous":
            return self._generate_continuous(prompts)
        # A seed from torch's random state per batch: torch.manual_seed(seed) makes a run repeat.
        self.engine.seed(int(torch.randint(2**62, ())))
        return [self._turn(g.tokens) for g in self.engine.generate_batch(prompts, self.cfg.max_new_tokens)]

    def _generate_continuous(self, prompts: list[list[int]]) -> list[Turn]:
        from transformers import GenerationConfig

        from drafter.attention import sdpa_attention

        config = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos or None, **self._generate_kwargs())
        with sdpa_attention(self.target.model):  # continuous batching takes SDPA, eager or flash only
            out = self.target.model.generate_batch(inputs=prompts, generation_config=config,
                                                   continuous_batching_config=self._paged_cache(prompts),
                                                   progress_bar=False)
        if len(out) != len(prompts):
            raise RegenerateError(f"continuous batching answered {len(out)} of {len(prompts)} prompts")
        # Request ids are "req_<index in prompts>".
        rows = sorted(out.items(), key=lambda item: int(item[0].rsplit("_", 1)[-1]))
        return [self._turn(list(result.generated_tokens)) for _, result in rows]

    def _paged_cache(self, prompts: list[list[int]], page: int = 256):
        """Continuous batching's paged KV cache sized to this work: batch_size rows of the longest
        prompt plus its answer. Left to itself, transformers sizes it from free memory, which on
        a CPU is most of the machine, zero-filled on every call (measured: 12.9 s before the first
        token for two 6-token answers of a tiny model; 0.9 s sized)."""
        from transformers import ContinuousBatchingConfig

        rows = min(len(prompts), self.cfg.batch_size)
        longest = max(len(p) for p in prompts) + self.cfg.max_new_tokens
        return ContinuousBatchingConfig(page_size=page, num_blocks=rows * math.ceil(longest / page) + 1,
                                        max_batch_tokens=max(longest, 2048), max_requests_per_batch=rows)

    def _turn(self, row: list[int]) -> Turn:
        """Generated ids -> the answer up to the first end token (padding after it ignored)."""
        stop = next((i for i, t in enumerate(row) if t in self.eos), None)
        body = row if stop is None else row[:stop]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        return Turn(text, "length" if stop is None else "stop", len(row) if stop is None else stop + 1)

    def _generate_safe(self, batch: list[Conversation]) -> None:
        """Generate for a batch; on failure split it so one bad request fails alone."""
        try:
            turns = self.generate([c.prompt_ids for c in batch])
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: isolate the culprit
            if len(batch) == 1:
                batch[0].error = f"generate failed: {type(exc).__name__}: {exc}"
                return
            half = len(batch) // 2
            self._generate_safe(batch[:half])
            self._generate_safe(batch[half:])
            return
        for conv, turn in zip(batch, turns):
            conv.answer(turn)

    def run(self, conversations: Iterable[Conversation], done: Done) -> None:
        pending = iter(conversations)
        pool_size = self.cfg.batch_size * 8  # a pool wide enough for length sorting to pay off
        active: list[Conversation] = []
        exhausted = False
        while True:
            while not exhausted and len(active) < pool_size:
                conv = next(pending, None)
                if conv is None:
                    exhausted = True
                else:
                    active.append(conv)
            for conv in active:
                if not conv.finished:
                    self._prepare(conv)
            for conv in [c for c in active if c.finished]:
                active.remove(conv)
                done(conv)
            if not active:
                if exhausted:
                    return
                continue
            active.sort(key=lambda c: len(c.prompt_ids))
            # Continuous batching takes the whole pool and keeps batch_size-ish rows busy itself.
            self._generate_safe(active if self.cfg.batching == "continuous" else active[: self.cfg.batch_size])


# ----- openai: any OpenAI-compatible server ----------------------------------------
def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(url: str, default_port: int | None = None) -> tuple[str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise RegenerateError(f"bad port in {redact_url(url)!r}") from None
    return (parts.hostname or "").rstrip("."), port or default_port


def api_key_headers(cfg: RegenerateConfig, base_url: str) -> dict[str, str]:
    """The Authorization header for `base_url`: the key goes to `api_key_host` only, never in clear text.

    A key is a password for one service: an env variable set for one server must not reach
    whatever `base_url` a config names, and plain http would show it to the network.
    """
    scheme = urlsplit(base_url).scheme
    host, port = _host_port(base_url, {"http": 80, "https": 443}.get(scheme))
    if scheme not in ("http", "https") or not host:
        raise RegenerateError(f"regenerate.base_url must be an http(s) URL, got {redact_url(base_url)!r}")
    in_clear = scheme == "http" and not is_loopback(host)
    if in_clear and redact_url(base_url) != base_url:
        raise RegenerateError(f"refusing to send the credentials in {redact_url(base_url)} over plain http to "
                              f"{host}: use https:// (plain http is for a server on this machine)")
    key = os.environ.get(cfg.api_key_env)
    if not key:
        return {}
    allowed = cfg.api_key_host
    if allowed:
        if "/" in allowed or "@" in allowed:
            raise RegenerateError(f"regenerate.api_key_host is a host name, optionally with :port "
                                  f"(e.g. api.example.com), not {allowed!r}")
        want_host, want_port = _host_port(f"//{allowed}")
        if want_host == host and want_port in (None, port):
            if in_clear:
                raise RegenerateError(f"refusing to send ${cfg.api_key_env} over plain http to {host}: use "
                                      "https:// (plain http is for a server on this machine)")
            return {"Authorization": f"Bearer {key}"}
    log.warning("$%s is set but not sent to %s%s: regenerate.api_key_host names the one host it goes to",
                cfg.api_key_env, host, f" (it is for {allowed})" if allowed else "")
    return {}


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, cfg: RegenerateConfig) -> None:
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self.shown_url = redact_url(self.base_url)  # what logs, errors and records say
        self.headers = api_key_headers(cfg, self.base_url)
        self.key_withheld = bool(os.environ.get(cfg.api_key_env)) and not self.headers
        self.optional: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": cfg.enable_thinking}}
        if cfg.top_k:
            self.optional["top_k"] = cfg.top_k
        self.model = cfg.model or self._discover_model()
        self.retries = 0  # requests retried (reported in the manifest)

    def _discover_model(self) -> str:
        import httpx

        try:
            resp = httpx.get(f"{self.base_url}/models", headers=self.headers, timeout=self.cfg.timeout_s)
            resp.raise_for_status()
            return resp.json()["data"][0]["id"]
        except Exception as exc:  # noqa: BLE001 - any failure means the same advice
            raise RegenerateError(
                f"cannot list the models of {self.shown_url} ({type(exc).__name__}: {exc}); "
                "set regenerate.model to the served model name"
            ) from None

    def params(self) -> dict[str, Any]:
        sent = _sampling(self.cfg)
        if "top_k" not in self.optional:
            sent["top_k"] = None  # the server refused the field: sampling ran without it
        return {**sent, "concurrency": self.cfg.concurrency, "base_url": self.shown_url}

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 600.0) + random.uniform(0, 0.1)
        ceiling = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter": spread retries, keep the growth

    async def complete(self, client, messages: list[dict]) -> Turn:
        import httpx

        cfg = self.cfg
        attempt = 0
        while True:
            body = {
                "model": self.model,
                "messages": messages,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "max_tokens": cfg.max_new_tokens,
                **self.optional,
            }
            retry_after = None
            try:
                # httpx's timeout bounds each read; wait_for bounds the whole request (a server
                # trickling bytes would otherwise hold a worker forever).
                resp = await asyncio.wait_for(
                    client.post(f"{self.base_url}/chat/completions", json=body, timeout=cfg.timeout_s),
                    cfg.timeout_s)
            except httpx.UnsupportedProtocol as exc:
                raise RequestFailed(f"{type(exc).__name__}: {exc}") from None
            except (httpx.TransportError, httpx.DecodingError, TimeoutError) as exc:
                # Connection, protocol and read failures, timeouts, a body that cannot be decoded.
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if isinstance(exc, TimeoutError):
                    reason = f"no complete response within timeout_s={cfg.timeout_s:g}"
            else:
                if resp.status_code == 200:
                    return self._parse(resp)
                text = resp.text[:300]
                if resp.status_code in (400, 422):
                    # Checked against this request's body: concurrent requests may all be refused.
                    refused = [f for f in OPTIONAL_FIELDS if f in body and f in text]
                    if refused:
                        for name in refused:
                            if self.optional.pop(name, None) is not None:
                                log.warning("%s refuses the request field %r; sending without it",
                                            self.shown_url, name)
                        continue
                if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
                    hint = ""
                    if resp.status_code in (401, 403) and self.key_withheld:
                        hint = (f" (${cfg.api_key_env} was not sent: set regenerate.api_key_host to this "
                                "server's host to send it)")
                    raise RequestFailed(f"HTTP {resp.status_code}: {text}{hint}")
                reason = f"HTTP {resp.status_code}: {text}"
                retry_after = retry_after_seconds(resp.headers.get("retry-after"))
            if attempt >= cfg.max_retries:
                raise RequestFailed(f"gave up after {attempt + 1} attempts; last: {reason}")
            self.retries += 1
            await asyncio.sleep(self.delay(attempt, retry_after))
            attempt += 1

    @staticmethod
    def _parse(resp) -> Turn:
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError(f"content is a {type(text).__name__}, not text")
            tokens = (data.get("usage") or {}).get("completion_tokens")
            return Turn(text, choice.get("finish_reason") or "stop", tokens)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RequestFailed(f"malformed response ({type(exc).__name__}: {exc}): {resp.text[:200]}") from None

    async def _run(self, conversations: Iterable[Conversation], done: Done) -> None:
        import httpx

        pending = iter(conversations)
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(headers=self.headers, limits=limits) as client:

            async def worker() -> None:
                # One conversation at a time per worker: turns depend on the previous answer.
                for conv in pending:  # workers share the iterator: no conversation is taken twice
                    try:
                        while (history := conv.history()) is not None:
                            conv.answer(await self.complete(client, list(history)))
                    except RequestFailed as exc:
                        conv.error = str(exc)
                    except Exception as exc:  # noqa: BLE001 - one conversation fails, not the worker
                        log.warning("conversation %s failed: %s: %s", conv.id, type(exc).__name__, exc)
                        conv.error = f"{type(exc).__name__}: {exc}"
                    done(conv)

            await asyncio.gather(*(worker() for _ in range(self.cfg.concurrency)))

    def run(self, conversations: Iterable[Conversation], done: Done) -> None:
        asyncio.run(self._run(conversations, done))


def make_backend(cfg: Config, target=None) -> Backend:
    if cfg.regenerate.backend == "openai":
        return OpenAIBackend(cfg.regenerate)
    if target is None:
        from drafter.target import load_target

        target = load_target(cfg)
    return LocalBackend(cfg.regenerate, target)


# ----- resumable output --------------------------------------------------------------
def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL file; with `repair`, a half-written last line (a killed run) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # a half-written last line
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not repair:
                raise RegenerateError(f"{path}: corrupt line {len(records) + 1}") from None
            break
        good += len(line)
    if good < len(data):
        if not repair:
            raise RegenerateError(f"{path}: ends with a half-written line")
        log.warning("%s: cutting off %d bytes of a half-written record", path, len(data) - good)
        with path.open("r+b") as f:
            f.truncate(good)
    return records


class Appender:
    """Append JSON lines durably (flushed and fsynced per record)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def _input_hash(split_dir: Path) -> str:
    return sha256_tree(split_dir, "*.arrow")


def _load_split(split_dir: Path):
    from datasets import load_from_disk

    try:
        return load_from_disk(str(split_dir))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types for a bad folder
        raise RegenerateError(f"cannot read the ingested split {split_dir}: {exc}") from exc


def _record(conv: Conversation, backend: Backend) -> dict:
    return {
        **conv.row,
        "messages": conv.out,
        "regen": {
            "backend": backend.name,
            "model": backend.model,
            "params": backend.params(),
            "finish_reasons": [t.finish_reason for t in conv.turns],
            "completion_tokens": [t.tokens for t in conv.turns],
        },
    }


# ----- the stage -----------------------------------------------------------------------
def _open_partial(out_dir: Path, run_key: str, splits: list[str], same_run: bool) -> Path:
    """The working folder of this run: resumed when its key matches, else started afresh."""
    partial = out_dir / ".partial"
    state_path = partial / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None and state.get("run_key") == run_key:
        return partial
    if state is not None:
        log.warning("discarding partial regeneration in %s (made with other inputs or parameters)", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if same_run:  # a finished run with errors left or a raised limit: start from its records
        for s in splits:
            if (out_dir / f"{s}.jsonl").is_file():
                shutil.copyfile(out_dir / f"{s}.jsonl", partial / f"{s}.jsonl")
    atomic_write_text(state_path, json.dumps({"run_key": run_key}))
    return partial


def _select(ds, done: dict[str, dict], limit: int | None):
    """Split the input rows into: ids in output order, conversations to do, skipped ids by reason."""
    order: list[str] = []
    todo: list[Conversation] = []
    skipped: dict[str, list[str]] = {}
    seen: set[str] = set()
    for i, row in enumerate(ds):
        cid = str(row["id"])
        reason = "duplicate id" if cid in seen else "limit" if limit is not None and i >= limit else None
        seen.add(cid)
        source = plan(row) if reason is None else reason
        if isinstance(source, str):
            skipped.setdefault(source, []).append(cid)
            continue
        order.append(cid)
        if cid not in done:
            todo.append(Conversation(row=dict(row), source=source))
    return order, todo, skipped


def _tokens(record: dict) -> int:
    return sum(t or 0 for t in record["regen"]["completion_tokens"])


def _regenerate_split(backend: Backend, split: str, ds, partial: Path, out_dir: Path, limit: int | None,
                      error_log: Appender) -> tuple[dict, list[dict], int]:
    """Regenerate one split (resuming), write it in input order; its counts, errors, new tokens."""
    done = {str(r["id"]): r for r in read_jsonl(partial / f"{split}.jsonl", repair=True)}
    order, todo, skipped = _select(ds, done, limit)
    errors: dict[str, dict] = {}
    out_log = Appender(partial / f"{split}.jsonl")
    bar = StageProgress(total=len(todo), desc=f"regenerate {split}", unit="conv", disable=not todo)

    def finished(conv: Conversation) -> None:
        if conv.error is None:
            done[conv.id] = _record(conv, backend)
            out_log.write(done[conv.id])
        else:
            errors[conv.id] = {"split": split, "id": conv.id, "reason": conv.error, "turn": len(conv.turns),
                               "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            error_log.write(errors[conv.id])
        bar.update(1)

    try:
        backend.run(todo, finished)
    finally:
        out_log.close()
        bar.close()
    records = [done[c] for c in order if c in done]
    _write_jsonl(out_dir / f"{split}.jsonl", records)
    finish: dict[str, int] = {}
    for r in records:
        for reason in r["regen"]["finish_reasons"]:
            finish[reason] = finish.get(reason, 0) + 1
    counts = {
        "input": len(ds),
        "succeeded": len(records),
        "errors": len(errors),
        "skipped": sum(len(v) for v in skipped.values()),
        "skipped_by_reason": {k: len(v) for k, v in skipped.items()},
        "turns": sum(len(r["regen"]["finish_reasons"]) for r in records),
        "finish_reasons": finish,
        "completion_tokens": sum(_tokens(r) for r in records),
    }
    check_accounting(counts["input"], {k: counts[k] for k in ("succeeded", "errors", "skipped")},
                     f"regenerate {split}")
    new = {c.id for c in todo}
    return counts, list(errors.values()), sum(_tokens(r) for r in records if str(r["id"]) in new)


def regenerate(cfg: Config, in_dir: Path, out_dir: Path, target=None) -> Manifest:
    """Replace the assistant turns of `in_dir/{train,holdout}` with the target's answers; returns the manifest."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    rcfg = cfg.regenerate
    splits = [s for s in SPLITS if (in_dir / s).is_dir()]
    if "train" not in splits:
        raise RegenerateError(f"no ingested train split in {in_dir} (expected {in_dir / 'train'}/): run ingest first")
    timer = Timer()
    with timer("load_backend"):
        backend = make_backend(cfg, target)
    inputs = {s: _input_hash(in_dir / s) for s in splits}
    # What makes two runs' outputs interchangeable (limit is not in it: raising it resumes).
    # The local target's dtype is part of it: bf16 and fp32 answers differ (a sampled token can flip).
    local = isinstance(backend, LocalBackend)
    fingerprint = backend.target.fingerprint if local else None
    run_key = sha256_json({"backend": backend.name, "model": backend.model, "target": fingerprint,
                           "dtype": dtype_name(backend.target.dtype) if local else None,
                           "sampling": _sampling(rcfg), "inputs": inputs, "seed": cfg.run.seed,
                           # (only when not transformers' own, so that runs made before the option keep their key)
                           **({"sampler": backend.sampler} if local and backend.sampler != "transformers" else {})})[:16]

    previous = read_manifest(out_dir) if (out_dir / "manifest.json").is_file() else None
    same_run = previous is not None and previous.params.get("run_key") == run_key
    if same_run and previous.params.get("limit") == rcfg.limit and not any(
        previous.counts[s]["errors"] for s in splits
    ):
        log.info("regeneration in %s is up to date (run key %s)", out_dir, run_key)
        return previous

    partial = _open_partial(out_dir, run_key, splits, same_run)
    if backend.name == "local":
        torch.manual_seed(cfg.run.seed)
    counts, errors, new_tokens = {}, [], 0
    error_log = Appender(partial / "errors.jsonl")  # a log of every failure, for a killed run
    try:
        for split in splits:
            with timer(f"generate_{split}"):
                counts[split], split_errors, tokens = _regenerate_split(
                    backend, split, _load_split(in_dir / split), partial, out_dir, rcfg.limit, error_log)
            errors += split_errors
            new_tokens += tokens
    finally:
        error_log.close()

    _write_jsonl(out_dir / "errors.jsonl", errors)
    cfg.save(out_dir / "config.yaml")
    seconds = sum(timer.durations.get(f"generate_{s}", 0.0) for s in splits)
    ingest_manifest = in_dir / "manifest.json"
    write_manifest(
        out_dir,
        "regenerate",
        inputs={"dir": str(in_dir), "splits": inputs,
                "ingest_manifest": sha256_file(ingest_manifest) if ingest_manifest.is_file() else None},
        params={"run_key": run_key, "backend": backend.name, "model": backend.model, "limit": rcfg.limit,
                **backend.params()},
        counts=counts,
        durations=timer.durations,
        outputs={f"{s}.jsonl": sha256_file(out_dir / f"{s}.jsonl") for s in splits}
        | {"errors.jsonl": sha256_file(out_dir / "errors.jsonl")},
        extra={"throughput": {
            "generated_tokens_this_run": new_tokens,
            "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None,
            "retries": getattr(backend, "retries", 0),
        }},
    )
    shutil.rmtree(partial, ignore_errors=True)
    return read_manifest(out_dir)
