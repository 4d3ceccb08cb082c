"""A cheap domain tag for a conversation: chat, code, math or other.

Drafter acceptance differs a lot between domains, so the tag drives per-domain
sampling, gates and drift. It only needs to be cheap and right most of the time, so it
is a weighted count of tell-tale signs in the user turns (code fences, program syntax,
programming words; equations, LaTeX, maths words and word problems), checked against
the labelled evaluation sets and hand-labelled examples in tests/test_traces_domain.py.

- code: writing, fixing or explaining programs (including programming puzzles);
- math: calculation, word problems, proofs, equations;
- other: text mostly in a non-Latin script, or with hardly any words (data dumps);
- chat: everything else (questions, writing, advice, role play, ...).
"""

from __future__ import annotations

import re
from functools import lru_cache

try:
    import hyperscan
except ImportError:  # no wheel for this platform: every pattern is searched with `re`
    hyperscan = None

from drafter.traces.hs_scan import Scanner

SAMPLE_CHARS = 1000  # the opening says what a prompt is about; keeps the cost bounded

# Signs worth 3 points each (counted once per pattern).
CODE_SIGNS = [
    re.compile(r"```"),
    re.compile(r"^[ \t]*(?:def |class |import |from [\w.]+ import|#include|using namespace|public |private |"
               r"fn |func |let |const |var |function |async |return |print\(|console\.log|SELECT |<div|<\?php)", re.M),
    re.compile(r"[;{]$", re.M),
    re.compile(r"\b(?:for|while|if|switch)\s*\([^)\n]*[;=<>]"),
    re.compile(r"(?:==|!=|=>|->|::|\+\+|&&|\|\|)"),
    re.compile(r"_[a-z]+\(|\.[a-z_]+\("),  # snake_case(, obj.method(
    re.compile(r"Traceback|Exception|Error:|stdin|stdout|Sample Input|Sample Output|Input Format|Constraints\b"),
]
# A request to write a program is worth 6.
TASK_VERBS = frozenset("write implement create generate fix debug refactor complete develop build".split())
CODE_TASK = re.compile(
    r"\b(?:write|implement|create|generate|fix|debug|refactor|complete|develop|build)\s+(?:me\s+)?(?:a|an|the|this|my|some)?\s*"
    r"(?:\w+\s+){0,2}(?:function|program|script|class|method|code|query|regex|snippet|api|unit tests?|website|web page|app)\b"
    r"|\bfix (?:the|this|my) bug\b"
)
LANGUAGES = frozenset("python javascript typescript java c++ c# golang rust kotlin swift php ruby sql bash html css".split())
CODE_WORDS = frozenset(
    "python javascript typescript java c++ c# golang rust kotlin swift php ruby scala sql html css bash shell "
    "powershell regex json yaml api sdk code coding program programming function functions method class script "
    "algorithm implement compile compiler debug bug refactor library framework react django flask nodejs pandas "
    "numpy docker kubernetes git github database query array list string integer variable loop recursion "
    "recursive return returns input output terminal linux backend frontend repository endpoint vba excel".split()
)
# Words that only come up around software: 3 points each, at most 6.
TECH_WORDS = frozenset(
    "python javascript typescript java c++ c# golang kotlin php sql mysql postgresql sqlite html css jquery react "
    "angular vue nodejs django flask fastapi spring laravel numpy pandas dataframe matplotlib pytorch tensorflow "
    "postgres arraylist hashmap regex json yaml xml api apis npm pip git github docker kubernetes bash powershell vba "
    "stacktrace traceback compiler runtime boolean struct enum async await lambda localhost http https".split()
)
MATH_SIGNS = [
    re.compile(r"\\(?:frac|sqrt|boxed|int|sum|prod|lim|cdot|times|le|ge|neq|pi|theta|alpha|log|sin|cos|binom|"
               r"mathbb|begin|left|right|dfrac|overline|angle|triangle|circ)\b|\\\[|\\\("),
    re.compile(r"\$[^$\n]{1,200}\$|\[asy\]"),
    re.compile(r"\d\s*[-+*/×÷^]\s*\d"),
    re.compile(r"[=<>] ?-?\d"),
    re.compile(r"\^[\d{]|\|[a-z]|\b[a-z] ?[-+*/] ?[a-z\d]\b ?[=<>]"),
    re.compile(r"\$\d"),
    re.compile(r"\d\s*%"),
]
# A quantitative question with numbers in it (a word problem) is worth 6.
WORD_PROBLEM = re.compile(
    r"\b(?:how many|how much|how long|how far|how fast|how old|how often|calculate|compute|what percent(?:age)?|"
    r"solve for|solve the equation|prove that|derivative|integral|simplify|factori[sz]e|evaluate the|"
    r"find the value|find all|in how many ways|what(?: is|'s) -?\d+|what are (?:their|the) (?:combined|total)|what(?: is|'s) the "
    r"(?:total|sum|value|probability|area|volume|perimeter|average|remainder|product|least|greatest|smallest|largest|"
    r"distance|difference|maximum|minimum|number))\b"
)
QUESTION_WORDS = frozenset("how what calculate compute solve prove derivative integral simplify factorise factorize "
                           "evaluate find in".split())
MATH_WORDS = frozenset(
    "solve calculate compute evaluate simplify equation equations integral derivative differentiate integrate "
    "probability prove proof theorem lemma polynomial matrix vector prime primes divisible remainder factor "
    "factorial fraction ratio percent percentage average mean median sum product total area volume perimeter "
    "radius diameter triangle circle square angle geometry algebra calculus arithmetic logarithm exponent "
    "sequence series digit digits real integers positive negative maximum minimum inequality expected cost "
    "costs price profit dollars cents hours minutes miles twice half find determine distance speed rate each "
    "value consecutive smallest largest greatest least express units paid earn earns spend spent".split()
)
WORD = re.compile(r"[a-z][a-z+#]*")
# (The number words grouped by first letter: the same matches, found without trying every word.)
NUMBER_WORD_ALTERNATION = (r"(?:t(?:wo|hree|en|welve|wenty|housand|wice)|f(?:our|ive)|s(?:ix|even)|e(?:ight|leven)|"
                           r"nine|h(?:undred|alf)|dozen)")
NUMBER = re.compile(r"\d+|\b" + NUMBER_WORD_ALTERNATION + r"\b")
# The same matches, found apart (see `_numbers`).
DIGITS = re.compile(r"\d+")
ASCII_DIGITS = "0123456789"
NUMBER_WORDS = frozenset("two three ten twelve twenty thousand twice four five six seven eight eleven nine hundred "
                         "half dozen".split())
NUMBER_WORD = re.compile(NUMBER_WORD_ALTERNATION + r"\b")
# Scripts other than Latin (Cyrillic, Greek, Hebrew, Arabic, Indic, Thai, CJK, Hangul, ...).
NON_LATIN = re.compile(r"[\u0370-\u03ff\u0400-\u052f\u0590-\u06ff\u0900-\u0dff\u0e00-\u0eff\u1100-\u11ff"
                       r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


# Characters without which a sign cannot match (a sign is searched only if one is in the text).
CODE_NEEDS = {2: ";{", 3: "(", 4: "=>:+&|", 5: "("}
MATH_NEEDS = {0: "\\", 1: "$[", 2: "-+*/×÷^", 3: "=<>", 4: "^|=<>", 5: "$", 6: "%"}


def _signs(signs: list[re.Pattern], needs: dict[int, str], text: str) -> int:
    n = 0
    for i, rx in enumerate(signs):
        need = needs.get(i)
        if (need is None or any(map(text.__contains__, need))) and rx.search(text):
            n += 1
    return n


# Every pattern, found in one Hyperscan pass over an ASCII text: the code signs, the maths signs,
# then those searched in the lowercased text (caseless on the text: the same for ASCII): the
# code task, the word problem and "in <language>" for each language.
IN_LANGUAGE = {lang: re.compile(re.escape(f"in {lang}")) for lang in sorted(LANGUAGES)}
SCANNED = [*CODE_SIGNS, *MATH_SIGNS, CODE_TASK, WORD_PROBLEM, *IN_LANGUAGE.values()]
CODE_IDS = frozenset(range(len(CODE_SIGNS)))
MATH_IDS = frozenset(range(len(CODE_SIGNS), len(CODE_SIGNS) + len(MATH_SIGNS)))
TASK_ID, PROBLEM_ID = len(CODE_SIGNS) + len(MATH_SIGNS), len(CODE_SIGNS) + len(MATH_SIGNS) + 1
LANGUAGE_IDS = {lang: PROBLEM_ID + 1 + i for i, lang in enumerate(IN_LANGUAGE)}
# Python's \s also holds these separators; Hyperscan's (ASCII) does not: such texts use `re`.
SEPARATORS = re.compile(r"[\x1c-\x1f]")
# The words the scores look at, found in the same pass as whole `WORD`s of the lowercased text:
# not next to another [a-z+#] character, after any "+" or "#" that starts the run (a `WORD`
# starts with a letter). Then one pattern for "at least two `WORD`s".
COUNTED = frozenset(CODE_WORDS | TECH_WORDS | MATH_WORDS | QUESTION_WORDS | TASK_VERBS | LANGUAGES | NUMBER_WORDS)
COUNTED_WORDS = sorted(COUNTED)
WORD_BASE = len(SCANNED)  # id of COUNTED_WORDS[0]
TWO_WORDS_ID = WORD_BASE + len(COUNTED_WORDS)
WORD_PATTERNS = [r"(?:^|[^a-z+#])[+#]*" + re.escape(w) + r"(?:[^a-z+#]|\z)" for w in COUNTED_WORDS]
# (a letter, later a character that ends its run, later another letter: two runs that start with one)
TWO_WORDS = r"[a-z].*[^a-z+#].*[a-z]"


@lru_cache(maxsize=1)
def _database():
    """The Hyperscan database of `SCANNED` (ASCII semantics: \\b and \\w as Python's on ASCII),
    the counted words and `TWO_WORDS` (caseless on the text: the lowercased text's matches)."""
    flags = []
    for i, rx in enumerate(SCANNED):
        f = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_UTF8
        f |= hyperscan.HS_FLAG_MULTILINE if rx.flags & re.M else 0
        f |= hyperscan.HS_FLAG_CASELESS if i >= TASK_ID else 0
        flags.append(f)
    # Every occurrence of a code or maths word (their repeats count); the others once.
    flags += [hyperscan.HS_FLAG_CASELESS | (0 if w in CODE_WORDS or w in MATH_WORDS else hyperscan.HS_FLAG_SINGLEMATCH)
              for w in COUNTED_WORDS]
    flags.append(hyperscan.HS_FLAG_CASELESS | hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_DOTALL)
    expressions = [rx.pattern.encode() for rx in SCANNED] + [w.encode() for w in WORD_PATTERNS] + [TWO_WORDS.encode()]
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=expressions, ids=list(range(len(expressions))), elements=len(expressions), flags=flags)
    return Scanner(db)


def _scan(text: str) -> list[int] | None:
    """In an ASCII text, the ids of the `SCANNED` patterns found (each once), of the counted
    words (`WORD_BASE + i`: code and maths words once per occurrence, the others once) and
    `TWO_WORDS_ID`. None for other texts, searched with `re` (~50 us for the patterns one by one
    on 1,000 characters)."""
    if hyperscan is None or not text.isascii() or SEPARATORS.search(text):
        return None
    hits: list[int] = []
    _database().scan(text.encode(), lambda i, *_: hits.append(i))
    return hits


def _scan_words(text: str, lower: str) -> tuple[set[int] | None, list[str], bool]:
    """(the `SCANNED` ids found or None for `re`, the counted words (code and maths words once per
    occurrence), whether the text has two `WORD`s) of a text and its lowercased form."""
    hits = _scan(text)
    if hits is None:
        words = WORD.findall(lower)
        return None, [w for w in words if w in COUNTED], len(words) >= 2  # (other repeats: harmless)
    counted = [COUNTED_WORDS[i - WORD_BASE] for i in hits if WORD_BASE <= i < TWO_WORDS_ID]
    return set(hits), counted, TWO_WORDS_ID in hits


def _numbers(lower: str, wordset: set[str] | None = None) -> int:
    """min(3, number of `NUMBER` matches) of a lowercased text (`wordset`: its `WORD`s, or those
    of them in `COUNTED`, if known).

    The matches are the maximal digit runs and the number words standing alone (between word
    boundaries), which never overlap, so they are counted apart. Each search runs only when it
    can find something: digits in an ASCII text are looked for with substring tests first; a
    number word standing alone is one of the text's `WORD`s, unless a "+" or "#" (which `WORD`
    takes in) is next to it. The words are found with a pattern that starts with a letter and
    kept when no word character precedes them."""
    n = 0
    if not lower.isascii() or any(map(lower.__contains__, ASCII_DIGITS)):
        for _ in DIGITS.finditer(lower):
            n += 1
            if n == 3:
                return n
    if wordset is not None and not (wordset & NUMBER_WORDS) and "+" not in lower and "#" not in lower:
        return n
    for m in NUMBER_WORD.finditer(lower):
        start = m.start()
        if start and _is_word(lower[start - 1]):
            continue
        n += 1
        if n == 3:
            break
    return n


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def scores(text: str, lower: str | None = None,
           scanned: tuple[set[int] | None, list[str], bool] | None = None) -> tuple[float, float, bool]:
    """(code score, math score, asks for a program) of a text (`lower` and its `_scan_words`, if known)."""
    lower = text.lower() if lower is None else lower
    found, counted, _ = _scan_words(text, lower) if scanned is None else scanned
    wordset = set(counted)  # (only counted words are looked up below)
    if found is None:  # each pattern searched with `re`, only where it can matter
        code_signs, math_signs = _signs(CODE_SIGNS, CODE_NEEDS, text), _signs(MATH_SIGNS, MATH_NEEDS, text)
        task = bool((wordset & TASK_VERBS and CODE_TASK.search(lower))
                    or any(f"in {lang}" in lower for lang in wordset & LANGUAGES))
    else:
        code_signs, math_signs = len(found & CODE_IDS), len(found & MATH_IDS)
        task = bool((wordset & TASK_VERBS and TASK_ID in found)
                    or any(LANGUAGE_IDS[lang] in found for lang in wordset & LANGUAGES))
    code = 3.0 * code_signs + (6.0 if task else 0.0) + 3.0 * min(len(wordset & TECH_WORDS), 2)
    code += min(sum(map(CODE_WORDS.__contains__, counted)), 6)  # counted with repeats, up to 6
    math = 3.0 * math_signs
    numbers = _numbers(lower, wordset)  # only "none" and "3 or more" matter
    if wordset & QUESTION_WORDS and numbers and (PROBLEM_ID in found if found is not None
                                                  else WORD_PROBLEM.search(lower)):
        math += 6.0
    math += 2.0 if numbers >= 3 else 0.0
    math += 0.75 * min(sum(map(MATH_WORDS.__contains__, counted)), 6)
    return code, math, task


def classify_text(text: str) -> str:
    return _classify_sample(text[:SAMPLE_CHARS])


# The tag depends on the sample alone: prompts repeat (retries, templates, pasted questions),
# so the last few thousand samples are remembered (at most CACHED * SAMPLE_CHARS characters).
CACHED = 32768


@lru_cache(maxsize=CACHED)
def _classify_sample(sample: str) -> str:
    non_latin = 0 if sample.isascii() else len(NON_LATIN.findall(sample))
    if non_latin > 0.25 * len(sample.strip()):
        return "other"
    lower = sample.lower()
    scanned = _scan_words(sample, lower)
    if not scanned[2] and non_latin < 2:  # fewer than two words
        return "other"
    code, math, task = scores(sample, lower, scanned)
    if code >= 6 and (code >= math or task):
        return "code"
    if math >= 6:
        return "math"
    if code >= 6:
        return "code"
    return "chat"


def classify(user_turns: list[str]) -> str:
    """Domain of a conversation from its user turns (the first one decides unless it is chat)."""
    if not user_turns:
        return "other"
    first = classify_text(user_turns[0])
    if first != "chat" or len(user_turns) == 1:
        return first
    return classify_text("\n".join(user_turns)[:SAMPLE_CHARS])
