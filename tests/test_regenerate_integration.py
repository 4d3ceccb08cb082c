"""Regeneration against real components: a `transformers serve` server killed and restarted
mid-run, a CLI run killed with SIGKILL and resumed, and the real SmolLM2 target."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from drafter.regenerate import read_jsonl, regenerate
from tests.conftest import ROOT
from tests.regen_data import conversation, make_rows, write_ingested

pytestmark = pytest.mark.integration

SERVE = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `transformers serve` process on 127.0.0.1, pinned to one model folder."""

    def __init__(self, model_dir: Path, port: int, log: Path) -> None:
        self.model_dir, self.port, self.log = model_dir, port, log
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", str(self.model_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--device", "cpu"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("transformers serve did not become healthy")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def tiny_model_dir(tiny_target, tmp_path):
    folder = tmp_path / "tiny-model"
    tiny_target.model.save_pretrained(folder)
    tiny_target.tokenizer.save_pretrained(folder)
    return folder


def test_openai_backend_survives_a_server_killed_and_restarted(tiny_config, tiny_model_dir, tmp_path):
    server = Server(tiny_model_dir, free_port(), tmp_path / "serve.log")
    server.start()
    try:
        ingested = write_ingested(tmp_path / "in", make_rows(12), make_rows(1, start=100))
        regen = tiny_config.regenerate.model_copy(update=dict(
            backend="openai", base_url=server.url, model=str(tiny_model_dir), concurrency=2, max_new_tokens=16,
            limit=None, timeout_s=30, max_retries=40, backoff_base_s=0.2, backoff_max_s=2.0))
        cfg = tiny_config.model_copy(update={"regenerate": regen})
        out = tmp_path / "out"
        result = {}
        run = threading.Thread(target=lambda: result.update(m=regenerate(cfg, ingested, out)))
        run.start()
        partial = out / ".partial" / "train.jsonl"
        while run.is_alive() and (not partial.is_file() or len(partial.read_text().splitlines()) < 2):
            time.sleep(0.05)
        done_at_kill = len(partial.read_text().splitlines())
        assert run.is_alive(), "the run ended before the server could be killed"
        server.kill()  # mid-run: requests in flight fail with connection errors
        time.sleep(1.0)
        server.start()  # same port; the client's retries carry the run over the gap
        run.join(timeout=300)
        assert not run.is_alive()
        manifest = result["m"]
    finally:
        server.kill()
    c = manifest.counts["train"]
    errors = read_jsonl(out / "errors.jsonl")
    assert (c["input"], c["succeeded"], c["errors"], c["skipped"]) == (12, 12, 0, 0), errors
    assert done_at_kill < 12 and manifest.throughput["retries"] > 0
    records = read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in make_rows(12)]
    rec = records[1]  # two turns: both answered by the server, the history kept
    assert rec["regen"]["backend"] == "openai" and rec["regen"]["model"] == str(tiny_model_dir)
    assert len(rec["regen"]["finish_reasons"]) == 2
    assert all(t and t <= 16 for t in rec["regen"]["completion_tokens"])
    assert manifest.params["top_k"] is None  # transformers serve refuses top_k; recorded as such


def test_cli_run_killed_with_sigkill_resumes(tiny_target, tmp_path):
    ingested = write_ingested(tmp_path / "in", make_rows(24), make_rows(1, start=100))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "drafter", "regenerate", "-c", str(ROOT / "configs" / "tiny.yaml"),
           "--in", str(ingested), "--out", str(out), "-s", "regenerate.limit=null", "-s", "regenerate.batch_size=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / ".partial" / "train.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_file() and len(partial.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {r["id"]: r for r in read_jsonl(partial, repair=True)}
    assert 2 <= len(first) < 24 and not (out / "manifest.json").exists()

    from drafter.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [a for a in cmd if "=" in a])
    manifest = regenerate(cfg, ingested, out, target=tiny_target)  # the resume, in-process
    assert manifest.counts["train"]["succeeded"] == 24
    records = read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in make_rows(24)]  # none lost, none twice
    assert all(r == first[r["id"]] for r in records if r["id"] in first)  # kept, not regenerated


def test_smollm2_local_regeneration(smollm2_target, tmp_path):
    """The real target answers coherently, turn by turn, through its own chat template."""
    from drafter.config import load_config

    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml",
                      ["regenerate.temperature=0", "regenerate.max_new_tokens=16"])
    two_turns = {**conversation(1, turns=2, system=True)}
    # A system prompt the answer does not hang on a tie for: with "You are a concise assistant."
    # the first token is "The" 24.69 vs "La" 24.69 in fp32, and bf16 flips it (margin here: 1.4).
    two_turns["messages"][0]["content"] = "Answer in one short sentence."
    two_turns["messages"][1]["content"] = "What is the capital of France?"
    two_turns["messages"][3]["content"] = "And what is the capital of Italy?"
    ingested = write_ingested(tmp_path / "in", [two_turns], [conversation(3)])
    manifest = regenerate(cfg, ingested, tmp_path / "out", target=smollm2_target)
    assert manifest.counts["train"]["succeeded"] == 1 and manifest.counts["holdout"]["succeeded"] == 1
    rec = read_jsonl(tmp_path / "out" / "train.jsonl")[0]
    answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
    assert "Paris" in answers[0] and "Rome" in answers[1]
    assert rec["messages"][0] == {"role": "system", "content": "Answer in one short sentence."}
    assert rec["regen"]["model"] == "SmolLM2-135M-Instruct"
    assert manifest.throughput["tokens_per_s"] > 0
