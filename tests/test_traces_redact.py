"""Redaction: recall on a labelled set, no false positives on ordinary code and prose."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from drafter.config import BUNDLED_EVAL_DIR
from drafter.traces import redact
from drafter.traces.redact import Redactor, luhn_ok, placeholder, secret_patterns

DATA = Path(__file__).parent / "data" / "redaction_labelled.jsonl"
CASES = [json.loads(line) for line in DATA.read_text().rstrip("\n").split("\n")]


def test_labelled_set_recall_and_no_false_positives():
    redactor = Redactor()
    found = missed = 0
    misses, false_positives = [], []
    for case in CASES:
        out, counts = redactor.redact(case["text"])
        if not case["secrets"]:
            if out != case["text"]:
                false_positives.append((case["text"], out))
            continue
        for secret in case["secrets"]:
            if secret["value"] not in out and placeholder(secret["kind"]) in out:
                found += 1
            else:
                missed += 1
                misses.append((secret["kind"], case["text"], out))
    positives = found + missed
    kinds = {s["kind"] for c in CASES for s in c["secrets"]}
    assert positives >= 150 and len(kinds) >= 15  # the set covers every kind the issue names
    assert found / positives >= 0.99, misses
    assert not false_positives, false_positives


@pytest.mark.parametrize("name", ["gsm8k", "math500", "aime25", "humaneval", "mbpp", "livecodebench", "mt-bench"])
def test_no_false_positive_on_evaluation_prompts(name):
    """Thousands of real maths, code and chat prompts hold no personal data or secrets.
    (arena-hard-v2 is left out: some of its prompts paste real-looking e-mail addresses.)"""
    redactor = Redactor()
    changed = []
    for line in (BUNDLED_EVAL_DIR / f"{name}.jsonl").read_text().rstrip("\n").split("\n"):
        for turn in json.loads(line)["turns"]:
            out, counts = redactor.redact(turn)
            if counts:
                changed.append((dict(counts), turn[:200]))
    assert not changed


def test_counts_and_typed_placeholders():
    redactor = Redactor()
    text = "mail a@b.com or c.d@e.org, key AKIAABCDEFGHIJKLMNOP, call +44 20 7946 0958"
    out, counts = redactor.redact(text)
    assert counts == {"email": 2, "aws_access_key": 1, "phone": 1}
    assert out == "mail [EMAIL] or [EMAIL], key [AWS_ACCESS_KEY], call [PHONE]"
    redactor.redact("x@y.io")
    assert redactor.totals["email"] == 3


def test_redaction_is_idempotent():
    redactor = Redactor()
    for case in CASES:
        once, _ = redactor.redact(case["text"])
        twice, counts = redactor.redact(once)
        assert twice == once and not counts


def test_truncated_private_key_block_is_removed_whole():
    body = "\n".join("MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7" for _ in range(5))
    text = f"my key:\n-----BEGIN RSA PRIVATE KEY-----\n{body}\n"  # cut off before its END line
    out, counts = Redactor().redact(text)
    assert counts == {"private_key": 1} and "MIIE" not in out


def test_luhn_and_card_context():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    out, counts = Redactor().redact("order id 4111111111111111 shipped")  # bare digits, no payment word
    assert not counts
    out, counts = Redactor().redact("my visa card is 4111111111111111")
    assert counts == {"credit_card": 1}


def test_secret_patterns_catch_what_redaction_removes():
    """The validation suite's regexes flag raw secrets and accept redacted text."""
    import re

    raw = [c["text"] for c in CASES if any(s["kind"] in ("aws_access_key", "github_token", "private_key") for s in c["secrets"])]
    patterns = [re.compile(p) for p in secret_patterns()]
    assert all(any(p.search(t) for p in patterns) for t in raw)
    redactor = Redactor()
    assert not any(p.search(redactor.redact(t)[0]) for t in raw for p in patterns)


PIECES = ["0", "1", "4", "9", " ", "-", ".", ":", "(", ")", "+", "@", "/", "_", "=", "a", "F", "x",
          "\x1c", "\x85", "\u00a0", "\u2003", "\u0663", "\uff13", "\u212a", "é", "\n", "\t",
          "key", "KEY", "kEy", "\u017f", "oken", "sk-", "sk-ant-", "eyJ", "://", "AKIA", "ghp_", "xox", "XoX", "earer",
          "bEaReR", "aWs", "gl", "PRIVATE KEY"]


@given(st.lists(st.sampled_from(PIECES), max_size=60).map("".join))
@example("415\x1c867\x1c5309")  # Python's \s holds the separators \x1c-\x1f, Hyperscan's does not
@example("415\u2003867\u20035309")
@example("\u0664\u0661\u0665 \u0668\u0666\u0667 \u0665\u0663\u0660\u0669")  # Arabic-Indic digits are \d
@example(".abc\x1cef." + "a" * 27)
@settings(max_examples=400, deadline=None)
def test_the_one_pass_prefilter_selects_what_the_hints_select(text):
    """The Hyperscan pass switches on the same detectors (and phone hints) as testing each
    hint and gate in Python, Unicode digits and spaces included: nothing is skipped."""
    assert redact._active(text) == redact._active_python(text)


# Token prefixes (and near misses), random-looking runs and separators: the case-sensitive
# token detectors' own material.
TOKEN_PIECES = ["glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "GR1348941", "glcbt-", "a0_", "glimt-", "glptt-",
                "glagent-", "gloas-", "gl", "pat-", "AKIA", "ASIA", "ghp_", "gho_", "github_pat_", "sk-", "sk-ant-",
                "xoxb-", "SG.", "pypi-", "sq0csp-", "eyJ", "aB3dE5gH7jK9mN1pQ3", "ZYXWVUTSRQPONMLK", "0123456789",
                "-", "_", ".", " ", "=", "\n", "English", "single"]
CASE_SENSITIVE = [d for d in redact.DETECTORS if d.hints and not d.pattern.flags & re.IGNORECASE]


@given(st.lists(st.sampled_from(TOKEN_PIECES), max_size=40).map("".join))
@example("CI token glpat-VtM_4cgPhUcJnfcck55y")
@example("glagent-" + "a" * 50)
@settings(max_examples=400, deadline=None)
def test_every_finding_holds_a_hint_of_its_detector(text):
    """A detector runs only on texts holding one of its hints: each of its matches must hold
    one, or a secret would pass unredacted (GitLab's hints are its prefixes with their dash,
    not "gl", which English words hold)."""
    for det in CASE_SENSITIVE:
        for m in det.pattern.finditer(text):
            assert any(h in m.group() for h in det.hints), (det.kind, m.group())
    assert not any(redact.DETECTORS[i].kind == "gitlab_token" for i in redact._active("English glory, single angle"))


CASELESS = [d for d in redact.DETECTORS if d.hints and d.pattern.flags & re.IGNORECASE]


def cased(word: str, mask: int) -> str:
    """`word` with the letters of `mask`'s set bits upper-cased, and k and s as Python's re also
    folds them (the Kelvin sign, the long s) where the next bit is set too."""
    out = []
    for i, ch in enumerate(word):
        if mask >> i & 1:
            ch = {"k": "\u212a", "s": "\u017f"}.get(ch, ch) if mask >> (i + 1) & 1 else ch.upper()
        out.append(ch)
    return "".join(out)


@given(st.sampled_from(["api_key", "secret", "access_token", "password", "passwd", "bearer", "aws_secret_key",
                        "xoxb-", "hooks.slack.com/services/"]), st.integers(0, 2**16 - 1))
@example("api_key", 0b0110000)  # api_kEy
@example("password", 0b1100)  # pa + long s
@settings(max_examples=300, deadline=None)
def test_case_insensitive_detectors_run_on_every_casing_of_their_hints(word, mask):
    """A case-insensitive detector is gated by its hints without case, the way its pattern
    matches: `api_kEy: ...` is redacted like `api_key: ...` (its hints were case-sensitive)."""
    text = cased(word, mask)
    active = redact._active(text)
    assert active == redact._active_python(text)
    for i, det in enumerate(redact.DETECTORS):
        if det in CASELESS and any(h in word for h in det.hints):
            assert i in active, (det.kind, text)
    if word == "api_key":
        value = "Zx8Qw3Rt7Yp2Lm9N"
        assert value not in Redactor().redact(f"{text}: {value}")[0]


@pytest.mark.skipif(redact.hyperscan is None, reason="no Hyperscan on this platform")
def test_prefilter_database_is_stored_and_checked(tmp_path, monkeypatch):
    # Compiled once and stored under $DRAFTER_HOME; a later process loads it (no compile); a
    # damaged file is compiled again. Every one flags texts as the Python tests do.
    monkeypatch.setenv("DRAFTER_HOME", str(tmp_path))
    compiled = []
    compile_ = redact._prefilter_database
    monkeypatch.setattr(redact, "_prefilter_database", lambda: compiled.append(1) or compile_())
    texts = [*redact.PROBES, "mail me: bob@example.org", "IBAN DE89 3704 0044 0532 0130 00", "ssh-rsa AAAAB3Nza"]
    first = redact._stored_database()
    (stored,) = (tmp_path / "hyperscan").iterdir()
    again = redact._stored_database()
    assert len(compiled) == 1
    stored.write_bytes(stored.read_bytes()[:5000])  # cut short
    third = redact._stored_database()
    assert len(compiled) == 2 and len(stored.read_bytes()) > 5000
    for db in (first, again, third):
        assert [redact._scan(db, t) for t in texts] == [redact._active_python(t) for t in texts]


@pytest.mark.skipif(redact.hyperscan is None, reason="no Hyperscan wheel here")
def test_threads_scanning_at_once_find_what_one_thread_finds():
    """Redaction and domain tags from four threads at once (a Dask worker's threads; the ingesting
    process beside a worker running in it): each thread scans with its own Hyperscan scratch
    space, and finds what one thread finds (one shared scratch raised ScratchInUseError)."""
    from concurrent.futures import ThreadPoolExecutor

    from drafter.traces import domain

    texts = [f"key AKIAQ7XK3MZ4PL2N8RTW, mail ana{i}@gmail.com; def f_{i}(x): return x == {i} and 3 + {i} = {i + 3}. " * 5
             for i in range(3000)]
    redactor = Redactor()

    def scanned(text):
        return redactor.redact(text)[0], domain._scan(text[: domain.SAMPLE_CHARS])

    want = [scanned(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(scanned, texts)) == want
    assert all("[EMAIL]" in r and hits for r, hits in want)
