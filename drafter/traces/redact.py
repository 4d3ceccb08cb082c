"""Redaction of personal data and secrets, before anything is written.

Each finding is replaced by a typed placeholder (`[EMAIL]`, `[OPENAI_KEY]`, ...) and
counted by type. Libraries do what they are good at: `detect-secrets` supplies the
vendor token patterns (AWS, GitHub, GitLab, Slack, JWT, Stripe, ...), `phonenumbers`
finds phone numbers (valid numbers only, so ordinary numbers in code and maths stay).
Patterns of our own cover what they lack: whole private key blocks, current OpenAI and
Anthropic keys, bearer tokens, high-entropy `api_key = "..."` assignments, e-mail
addresses, Luhn-checked card numbers and globally routable IP addresses.

Every detector has cheap literal hints or a small gate regex: a text containing none of
them skips the detector. All hints and gates (and the phone-number hints) are matched in one
pass of a Hyperscan database, so ordinary text costs one scan; without Hyperscan the same
tests run one by one in Python (`_active_python`, the reference the scan is tested against).

Text that holds JSON as a string (a pasted request body, a logged payload, a quarantined
line) hides secrets behind escapes: `\\"password\\": \\"...\\"`, `jane\\u0040mail.com`,
`Bearer abc\\/def`. The detectors also run on the JSON-unescaped view of such text (and on
the view of that view), and what they find there is masked in the text itself.
"""

from __future__ import annotations

import ipaddress
import math
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import phonenumbers

try:
    import hyperscan
except ImportError:  # no wheel for this platform: the hints are tested one by one
    hyperscan = None
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector

from drafter.traces.hs_scan import Scanner


@dataclass(frozen=True)
class Detector:
    kind: str  # placeholder type, e.g. "email" -> "[EMAIL]"
    pattern: re.Pattern
    hints: tuple[str, ...] = ()  # the regex runs only if one of these is in the text ("" = always)
    group: int = 0  # the part of the match to replace (e.g. the password inside a URL)
    check: Callable[[str], bool] | None = None  # extra validation of the replaced part
    gate: re.Pattern | None = None  # instead of hints: a cheap regex that must match first

    def __post_init__(self) -> None:
        # A case-insensitive pattern's hints gate it without case too (`api_kEy`, `AwS`, and the
        # Kelvin sign and long s that Python's re folds to k and s, as Hyperscan does).
        if self.hints and self.gate is None and self.pattern.flags & re.IGNORECASE:
            object.__setattr__(self, "gate", re.compile("(?i)" + "|".join(map(re.escape, self.hints))))

    def applies(self, text: str) -> bool:
        if self.gate is not None:
            return self.gate.search(text) is not None
        return any(h in text for h in self.hints)


def placeholder(kind: str) -> str:
    return f"[{kind.upper()}]"


# ----- validators --------------------------------------------------------------------
def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    if not 13 <= len(digits) <= 19 or not luhn_ok(digits):
        return False
    # Issuer prefixes (IIN) of the card networks: a random Luhn-valid number rarely has one.
    two, four = int(digits[:2]), int(digits[:4])
    return (
        digits[0] == "4"  # Visa
        or 51 <= two <= 55 or 2221 <= four <= 2720  # Mastercard
        or two in (34, 37)  # American Express
        or digits.startswith(("6011", "65")) or 644 <= int(digits[:3]) <= 649  # Discover
        or 3528 <= four <= 3589  # JCB
        or 300 <= int(digits[:3]) <= 305 or two in (36, 38)  # Diners
        or two == 62  # UnionPay
        or two in (50, 56, 57, 58) or digits.startswith("67")  # Maestro
    )


def _ip_ok(text: str) -> bool:
    """Only globally routable addresses: loopback, private, documentation, netmasks stay."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if ip.version == 6 and sum(1 for g in text.split(":") if g) < 3:
        return False  # "1::2" is also a Python slice
    return ip.is_global and not text.startswith("255.")


def entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())


PLACEHOLDER_WORDS = re.compile(r"(?i)your|example|sample|dummy|placeholder|xxxx|redacted|changeme|token_here|<|>|\$\{|\{\{")


def _random_looking(token: str, min_len: int = 16) -> bool:
    """Secrets are random strings: long, letters and digits, high entropy, not a placeholder."""
    return (
        len(token) >= min_len
        and any(c.isdigit() for c in token)
        and any(c.isalpha() for c in token)
        and entropy(token) >= 3.0
        and not PLACEHOLDER_WORDS.search(token)
    )


def _jwt_ok(token: str) -> bool:
    return JwtTokenDetector.is_formally_valid(token)


# Generic TLDs seen in real addresses; any two-letter country code is accepted too. A list
# (rather than any word) keeps `y = x@self.weight` (matrix product in Python) from matching.
COMMON_TLDS = frozenset(
    "com org net edu gov mil int info biz name pro mobi app dev io ai co me tv cc ly gg sh "
    "cloud online site tech store shop blog email mail live life world today news media "
    "agency company business solutions services consulting digital network systems group "
    "global international academy school university college health care clinic law legal "
    "finance bank money capital fund insurance travel space studio design art photo "
    "xyz top club link click work works page one zone team social family love asia eu "
    "museum aero coop jobs tel travel cat post berlin london nyc paris tokyo".split()
)


def _email_ok(text: str) -> bool:
    if text.startswith("git@"):
        return False  # an SSH remote (git@github.com:owner/repo), not a person
    tld = text.rsplit(".", 1)[-1]
    if not (tld.islower() or tld.isupper()):
        return False
    tld = tld.lower()
    return len(tld) == 2 or tld in COMMON_TLDS


# ----- detectors, in the order they run -----------------------------------------------
def _ds(plugin, kind: str, hints: tuple[str, ...], group: int = 0, check=None) -> list[Detector]:
    """Detectors from a detect-secrets plugin's own patterns."""
    return [Detector(kind, rx, hints, group, check) for rx in plugin.denylist]


DETECTORS: list[Detector] = [
    # Whole PEM/OpenSSH/PGP private key blocks (detect-secrets only flags the header line);
    # a block cut off before its END line is redacted to the end of its base64 body.
    Detector(
        "private_key",
        re.compile(
            r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----"
            r"(?:.*?-----END \1-----|[A-Za-z0-9+/=\s:,\-\\n]*)",
            re.S,
        ),
        ("PRIVATE KEY",),
    ),
    Detector("jwt", JwtTokenDetector.denylist[0], ("eyJ",), check=_jwt_ok),
    Detector("anthropic_key", re.compile(r"sk-ant-[A-Za-z0-9_\-]{20,}"), ("sk-ant-",)),
    *_ds(OpenAIDetector, "openai_key", ("T3BlbkFJ",)),
    # Current OpenAI keys (sk-proj-, sk-svcacct-, sk-admin-, legacy sk-): long and random.
    Detector(
        "openai_key",
        re.compile(r"(?<![\w-])sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_\-]{20,}"),
        ("sk-",),
        check=lambda s: _random_looking(s.split("-", 2)[-1] if s.count("-") > 1 else s[3:], 20),
    ),
    Detector("aws_access_key", AWSKeyDetector.denylist[0], ("AKIA", "ASIA", "ABIA", "ACCA", "A3T")),
    Detector("aws_secret_key", AWSKeyDetector.denylist[1], ("aws",), group=1),
    Detector("github_token", re.compile(r"github_pat_[A-Za-z0-9_]{50,}"), ("github_pat_",)),
    *_ds(GitHubTokenDetector, "github_token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    # (every GitLab prefix with its dash: "gl" alone is in "English" and "single")
    *_ds(GitLabTokenDetector, "gitlab_token", ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "GR1348941", "glcbt-",
                                               "glimt-", "glptt-", "glagent-", "gloas-")),
    *_ds(SlackDetector, "slack_token", ("xox", "hooks.slack.com")),
    *_ds(StripeDetector, "stripe_key", ("k_live_",)),
    *_ds(SendGridDetector, "sendgrid_key", ("SG.",)),
    *_ds(PypiTokenDetector, "pypi_token", ("pypi-",)),
    *_ds(SquareOAuthDetector, "square_token", ("sq0csp-",)),
    *_ds(AzureStorageKeyDetector, "azure_storage_key", ("AccountKey=",)),
    *[
        # The gate is wider than the token (any non-space, non-dot run): Hyperscan cannot hold
        # a Unicode \w repeated 27 times, and a wider gate only runs the detector more often.
        Detector("discord_token", rx, gate=re.compile(r"\.[^.\s]{6}\.[^.\s]{27}"), check=lambda s: _random_looking(s, 24))
        for rx in DiscordBotTokenDetector.denylist
    ],
    Detector(
        "bearer_token",
        re.compile(r"(?i)\bbearer\s+([A-Za-z0-9\-._~+/]{16,}=*)"),
        ("earer",),
        group=1,
        check=_random_looking,
    ),
    # `api_key = "..."`, `"secret": "..."`, `token: ...` with a random-looking value.
    Detector(
        "secret",
        re.compile(
            r"(?i)(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|client[_-]?secret|"
            r"password|passwd)[\"']?\s*[:=]\s*[\"'`]?([^\s\"'`,;]{12,})"
        ),
        ("key", "ecret", "oken", "assw"),
        group=1,
        check=lambda s: _random_looking(s, 12),
    ),
    # Passwords in URLs (user:password@host); detect-secrets' pattern, group 1 = the password.
    *_ds(BasicAuthDetector, "url_password", ("://",), group=1, check=lambda s: not PLACEHOLDER_WORDS.search(s)),
    Detector(
        "email",
        re.compile(r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+\-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"),
        ("@",),
        check=_email_ok,
    ),
    # Grouped card numbers (4-4-4-4, Amex 4-6-5) that are not part of a longer list of
    # numbers; a bare run of 13-19 digits only next to a payment word (ids and big numbers
    # in code and maths pass the Luhn check one time in ten).
    Detector(
        "credit_card",
        re.compile(r"(?<![\d.\-])(?<!\d[ -])(?:\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})(?![\d\-]|\.\d|[ -]\d)"),
        gate=re.compile(r"\d{4}[ -]\d{4}"),
        check=_card_ok,
    ),
    Detector(
        "credit_card",
        re.compile(
            r"(?i)(?:card|visa|mastercard|amex|american express|discover|credit|debit|\bcc\b|payment|"
            r"karte|tarjeta|carte|cartão|carta)[^\d\n]{0,40}(?<![\d.\-])(\d{13,19})(?![\d\-]|\.\d)"
        ),
        gate=re.compile(r"\d{13}"),
        group=1,
        check=_card_ok,
    ),
    Detector(
        "ip_address",
        re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)"),
        gate=re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d"),
        check=_ip_ok,
    ),
    Detector(
        "ip_address",
        re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){1,7}:?(?:[0-9A-Fa-f]{1,4}:?){0,7}[0-9A-Fa-f]{1,4}(?![\w:])"),
        gate=re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:?[0-9A-Fa-f]"),
        check=_ip_ok,
    ),
]

# Where a phone number may be: international (+CC ...), grouped national, or a bare run of
# 10-11 digits. The matcher then runs on a small window around each candidate only.
# North American numbers are grouped 3-3-4; other countries' national formats vary.
NANP_HINT = re.compile(r"\d{3}\)?[\s.\-]?\d{3}[\s.\-]\d{4}|\+\d[\d\s().\-]{5,}\d|\d{10,11}")
ANY_HINT = re.compile(r"\d{2,5}\)?[\s.\-]\d{2,4}[\s.\-]?\d{2,5}|\+\d[\d\s().\-]{5,}\d|\d{10,11}")
TWO_DIGITS = re.compile(r"\d\d")  # every phone number format has two adjacent digits somewhere
# A bare run of digits is a phone number only after a word that says so.
PHONE_WORDS = re.compile(r"(?i)(?:phone|tel|call|mobile|cell|fax|whatsapp|sms|text me|contact|number|reach me|ring)\W{0,3}(?:\w+\W{1,3}){0,3}$")


# Which detectors each hint switches on, and the detectors gated by a regex instead:
# one pass of plain substring tests per text decides what runs.
HINT_TABLE: list[tuple[str, tuple[int, ...]]] = sorted(
    {h: tuple(i for i, d in enumerate(DETECTORS) if d.gate is None and h in d.hints)
     for d in DETECTORS for h in d.hints}.items()
)
GATED = [i for i, d in enumerate(DETECTORS) if d.gate is not None]


PHONE_IDS = {"nanp": len(DETECTORS), "any": len(DETECTORS) + 1}  # prefilter ids of the phone hints
PHONE_HINTS = set(PHONE_IDS.values())


def _active_python(text: str) -> set[int]:
    """The detectors whose hint or gate is in the text, and the phone hints that match."""
    active = {i for i in GATED if DETECTORS[i].gate.search(text)}
    for hint, idxs in HINT_TABLE:
        if hint in text:
            active.update(idxs)
    active.update(i for name, i in PHONE_IDS.items() if (NANP_HINT if name == "nanp" else ANY_HINT).search(text))
    return active


def _prefilter_patterns() -> tuple[list[tuple[str, int]], int]:
    """(pattern, detector index) of every hint (literal), gate and phone hint, and their flags."""
    patterns = [(re.escape(h), idx) for h, idxs in HINT_TABLE for idx in idxs]
    patterns += [(DETECTORS[i].gate.pattern, i) for i in GATED]
    patterns += [(NANP_HINT.pattern, PHONE_IDS["nanp"]), (ANY_HINT.pattern, PHONE_IDS["any"])]
    # Python's \s also holds the separators \x1c-\x1f (every \s here is inside a [class]).
    patterns = [(p.replace("\\s", "\\s\\x1c-\\x1f"), i) for p, i in patterns]
    return patterns, hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_UCP


def _prefilter_database():
    """One Hyperscan database of every hint (literal), gate and phone hint, each reported once
    under its detector's index. UTF-8 with Unicode properties, as Python's `re` reads `\\d`."""
    patterns, flags = _prefilter_patterns()
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=[p.encode() for p, _ in patterns], ids=[i for _, i in patterns],
               elements=len(patterns), flags=[flags] * len(patterns))
    return db


# Texts the prefilter must flag exactly as the Python tests do before a stored database is used.
PROBES = ("call (415) 867-5309 or mail ana.lopez@gmail.com, key AKIAQ7XK3MZ4PL2N8RTW",
          "token ghp_a1B2c3D4e5a1B2c3D4e5a1B2c3D4e5f6G7h8 from 10.0.0.1 and 4111 1111 1111 1111",
          "nothing to see here", "+44 20 7946 0958 and 2001:db8::1")


def _stored_database():
    """The prefilter database, compiled once (~1.6 s) and kept under $DRAFTER_HOME/hyperscan,
    named by the hash of its patterns, flags and Hyperscan version; a stored one that does not
    load, or flags the probe texts otherwise than the Python tests, is compiled again."""
    import hashlib
    import json
    import os
    import tempfile

    from drafter.state import state_paths

    patterns, flags = _prefilter_patterns()
    key = hashlib.sha256(json.dumps([patterns, flags, hyperscan.__version__, hyperscan.HS_MODE_BLOCK]).encode())
    path = state_paths().root / "hyperscan" / f"redact-prefilter-{key.hexdigest()[:20]}.db"
    try:
        db = Scanner(hyperscan.loadb(path.read_bytes(), hyperscan.HS_MODE_BLOCK))
        if all(_scan(db, t) == _active_python(t) for t in PROBES):
            return db
    except (OSError, hyperscan.error):
        pass
    db = _prefilter_database()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(hyperscan.dumpb(db))
        os.replace(tmp, path)  # atomic: workers storing it at once each write a whole file
    except OSError:
        pass  # a read-only home: compiled on every run
    return Scanner(db)


def _scan(db: Scanner, text: str) -> set[int]:
    found: set[int] = set()
    db.scan(text.encode("utf-8", "surrogatepass"), _on_match, found)
    return found


def _on_match(idx: int, start: int, end: int, flags: int, found: set[int]) -> None:
    found.add(idx)


_DATABASE = None


def _active(text: str) -> set[int]:
    global _DATABASE
    if hyperscan is None:
        return _active_python(text)
    if _DATABASE is None:
        _DATABASE = _stored_database()
    return _scan(_DATABASE, text)


# ----- JSON-escaped text -------------------------------------------------------------------
ESCAPE = re.compile(r'\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
ESCAPE_LEVELS = 3  # JSON in a JSON string in a log line: each level doubles the backslashes


def unescape(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` with its JSON string escapes decoded, and anchors (view offset, text offset) at
    each escape and after it, from which `to_text` maps a position in the view back."""
    out, anchors, last, pos = [], [], 0, 0
    for m in ESCAPE.finditer(text):
        out.append(text[last : m.start()])
        pos += m.start() - last
        high, low, code, simple = m.groups()
        if high:
            out.append(chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00))
        else:
            out.append(chr(int(code, 16)) if code else SIMPLE_ESCAPES[simple])
        anchors += [(pos, m.start()), (pos + 1, m.end())]
        pos, last = pos + 1, m.end()
    out.append(text[last:])
    return "".join(out), anchors


def to_text(pos: int, anchors: list[tuple[int, int]]) -> int:
    i = bisect_right(anchors, (pos, math.inf)) - 1
    if i < 0:
        return pos
    view, text = anchors[i]
    return text + pos - view


def escaped_views(text: str):
    """(view, anchor lists from the view back to `text`) for each level of JSON escaping."""
    maps: list[list[tuple[int, int]]] = []
    for _ in range(ESCAPE_LEVELS):
        if ESCAPE.search(text) is None:
            return
        text, anchors = unescape(text)
        maps.append(anchors)
        yield text, maps


def _map_back(pos: int, maps: list[list[tuple[int, int]]]) -> int:
    for anchors in reversed(maps):
        pos = to_text(pos, anchors)
    return pos


@dataclass
class Redactor:
    """`redact(text) -> (clean_text, Counter of kinds)`; counts accumulate in `totals`."""

    phone_regions: tuple[str, ...] = ("US",)
    totals: Counter = field(default_factory=Counter)

    def redact(self, text: str) -> tuple[str, Counter]:
        found: Counter = Counter()
        if not text:
            return text, found
        if "\\" in text:
            text = self._escaped(text, found)
        active = _active(text)
        if active:
            for i in sorted(active - PHONE_HINTS):
                text = self._apply(DETECTORS[i], text, found)
            if PHONE_IDS[self._phone_hint] in active:
                text = self._phones(text, found)
        if found:  # (most texts hold nothing to redact)
            self.totals.update(found)
        return text, found

    def redact_json(self, value):
        """A parsed JSON value with every string in it (keys too) redacted."""
        if isinstance(value, str):
            return self.redact(value)[0]
        if isinstance(value, list):
            return [self.redact_json(v) for v in value]
        if isinstance(value, dict):
            out = {}
            for key, v in value.items():
                key = self.redact(key)[0] if isinstance(key, str) else key
                base, n = key, 1
                while key in out:  # two keys redacted to the same placeholder
                    n += 1
                    key = f"{base}#{n}"
                out[key] = self.redact_json(v)
            return out
        return value

    @staticmethod
    def _matches(det: Detector, text: str):
        """(start, end) of each accepted finding of one detector, left to right, not overlapping."""
        last = 0
        for m in det.pattern.finditer(text):
            start, end = m.span(det.group)
            if start < last or start == end:
                continue
            if det.check is not None and not det.check(m.group(det.group)):
                continue
            yield start, end
            last = end

    @classmethod
    def _apply(cls, det: Detector, text: str, found: Counter) -> str:
        spans = [(start, end, det.kind) for start, end in cls._matches(det, text)]
        return _replace(text, spans, found)

    def _escaped(self, text: str, found: Counter) -> str:
        """Mask in `text` what the detectors find in its JSON-unescaped views."""
        spans, unicode = [], "\\u" in text  # only \uXXXX can hide a phone number's digits (the slow matcher)
        for view, maps in escaped_views(text):
            hits = [(s, e, DETECTORS[i].kind) for i in sorted(_active(view) - PHONE_HINTS)
                    for s, e in self._matches(DETECTORS[i], view)]
            if unicode:
                hits += [(s, e, "phone") for s, e in self._phone_spans(view)]
            spans += [(_map_back(s, maps), _map_back(e, maps), kind) for s, e, kind in hits]
        return _replace(text, spans, found)

    @property
    def _phone_hint(self) -> str:
        return "nanp" if set(self.phone_regions) <= {"US", "CA"} else "any"

    def _phones(self, text: str, found: Counter) -> str:
        return _replace(text, [(s, e, "phone") for s, e in self._phone_spans(text)], found)

    def _phone_spans(self, text: str) -> set[tuple[int, int]]:
        spans: set[tuple[int, int]] = set()
        if not TWO_DIGITS.search(text):
            return spans
        hint = NANP_HINT if self._phone_hint == "nanp" else ANY_HINT
        for cand in hint.finditer(text):
            if cand.group(0).isdigit() and not PHONE_WORDS.search(text[max(0, cand.start() - 40) : cand.start()]):
                continue
            lo, hi = max(0, cand.start() - 24), cand.end() + 24
            for region in self.phone_regions:
                # EXACT_GROUPING: digits grouped the way the number is written in that country,
                # so lists of numbers, decimals and grid rows in code and maths do not match.
                for m in phonenumbers.PhoneNumberMatcher(text[lo:hi], region, leniency=phonenumbers.Leniency.EXACT_GROUPING):
                    start, end = lo + m.start, lo + m.end
                    if not (m.raw_string.isdigit() and not PHONE_WORDS.search(text[max(0, start - 40) : start])):
                        spans.add((start, end))
        return spans


def _replace(text: str, spans: list[tuple[int, int, str]], found: Counter) -> str:
    """Each span replaced by its placeholder; a span overlapping an earlier one joins it."""
    if not spans:
        return text
    merged: list[list] = []
    for start, end, kind in sorted(spans, key=lambda s: (s[0], -s[1])):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, kind])
    out, last = [], 0
    for start, end, kind in merged:
        out += [text[last:start], placeholder(kind)]
        found[kind] += 1
        last = end
    out.append(text[last:])
    return "".join(out)


def secret_patterns() -> list[str]:
    """Regexes a validated row must not match (for the Great Expectations suite): the
    unambiguous secret formats, so a hit means redaction missed something."""
    return [
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY",
        r"(?:AKIA|ASIA)[0-9A-Z]{16}",
        r"sk-ant-[A-Za-z0-9_\-]{20,}",
        r"sk-[A-Za-z0-9_\-]*T3BlbkFJ",
        r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9_]{36}",
        r"github_pat_[A-Za-z0-9_]{50,}",
        r"xox[abposr]-(?:\d+-)+[a-z0-9]+",
        r"eyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.",
        r"(?:r|s)k_live_[0-9a-zA-Z]{24}",
    ]


# What `secret_patterns` flags after redaction is masked in quarantine excerpts, widened to
# the whole token around it (a pattern may match only a prefix: a JWT's first two parts)
# and, after a private key header, over the key body.
LEFTOVER = [re.compile(p) for p in secret_patterns()]
TOKEN_AFTER = re.compile(r"[\w\-.+/=~]*")
KEY_BODY_AFTER = re.compile(r"[A-Za-z0-9+/=\s:,\-\\]*")


def _token_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_-.+/=~"


def mask_leftovers(text: str) -> str:
    spans = []
    for pattern in LEFTOVER:
        after = KEY_BODY_AFTER if "PRIVATE KEY" in pattern.pattern else TOKEN_AFTER
        for m in pattern.finditer(text):
            start = m.start()
            while start > 0 and _token_char(text[start - 1]):  # a scan, not a regex: linear in the token
                start -= 1
            spans.append((start, after.match(text, m.end()).end(), "secret"))
    return _replace(text, spans, Counter())


def has_leftover(text: str) -> bool:
    """Does a secret pattern match the text or one of its JSON-unescaped views?"""
    views = [text] + [view for view, _ in escaped_views(text)]
    return any(p.search(view) for view in views for p in LEFTOVER)
