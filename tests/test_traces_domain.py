"""The domain classifier against labelled prompts: the bundled evaluation sets and hand-labelled examples."""

import json
from collections import Counter

import pytest

from drafter.config import BUNDLED_EVAL_DIR
from drafter.traces.domain import classify, classify_text

BOILERPLATE = "Please reason step by step, and put your final answer within \\boxed{}."


def first_turns(name):
    lines = (BUNDLED_EVAL_DIR / f"{name}.jsonl").read_text().rstrip("\n").split("\n")
    # The maths sets end every prompt with the same instruction: leave it out, users do not write it.
    return [json.loads(line)["turns"][0].replace(BOILERPLATE, "").strip() for line in lines]


@pytest.mark.parametrize(
    "name, domain, minimum",
    [("gsm8k", "math", 0.9), ("math500", "math", 0.9), ("aime25", "math", 0.9),
     ("humaneval", "code", 0.95), ("mbpp", "code", 0.95), ("livecodebench", "code", 0.95)],
)
def test_evaluation_sets(name, domain, minimum):
    prompts = first_turns(name)
    share = sum(classify_text(p) == domain for p in prompts) / len(prompts)
    assert share >= minimum, f"{name}: {share:.2%} tagged {domain}"


def test_mt_bench_categories():
    """MT-bench comes in blocks of 10: writing, roleplay, reasoning, math, coding, extraction, stem, humanities."""
    labels = ["chat"] * 30 + ["math"] * 10 + ["code"] * 10 + ["chat"] * 30
    prompts = first_turns("mt-bench")
    right = sum(classify_text(p) == label for p, label in zip(prompts, labels))
    assert right / len(prompts) >= 0.85


HAND_LABELLED = [
    ("What's a good name for a golden retriever puppy?", "chat"),
    ("Write a short poem about autumn leaves.", "chat"),
    ("Can you summarise the causes of the French Revolution in three bullet points?", "chat"),
    ("Draft a polite email asking my landlord to fix the heating.", "chat"),
    ("What are some tips for sleeping better?", "chat"),
    ("Is Python a good first language?", "chat"),
    ("Tell me a joke about cats.", "chat"),
    ("Explain the difference between weather and climate.", "chat"),
    ("Write a python function that checks whether a string is a palindrome.", "code"),
    ("Why does this give a TypeError?\n```python\nx = '1' + 2\n```", "code"),
    ("How do I make an HTTP request in JavaScript?", "code"),
    ("Java add to the arraylist of a class type", "code"),
    ("SELECT name FROM users WHERE age > 30; why is this query slow on postgres?", "code"),
    ("Fix the bug: for (int i = 0; i <= n; i++) { sum += a[i]; }", "code"),
    ("What is 15% of 80?", "math"),
    ("Solve for x: 3x + 7 = 22", "math"),
    ("A train travels 120 miles in 2 hours. How fast is it going?", "math"),
    ("What is the derivative of x^3 * sin(x)?", "math"),
    ("Prove that the square root of 2 is irrational.", "math"),
    ("If I have 3 apples and buy 5 more, how many do I have?", "math"),
    ("고등교육의 필요성에 관한 영어 에세이를 1000자 이내로 작성하시오.", "other"),
    ("我需要建立一個powerpoint你幫我摘要一篇內容", "other"),
    ("Напиши стихотворение о весне", "other"),
    ("!!! ??? ...", "other"),
]


def test_hand_labelled():
    wrong = [(t, want, classify_text(t)) for t, want in HAND_LABELLED if classify_text(t) != want]
    assert len(wrong) <= 1, wrong


def test_conversation_uses_first_turn_then_all_turns():
    assert classify(["Write a function in Python to sort a list", "thanks, now make it faster"]) == "code"
    assert classify(["hi there", "solve 2x + 3 = 11 for x and compute x^2"]) == "math"
    assert classify([]) == "other"


@pytest.mark.parametrize("text", [
    "", "no numbers here", "two", "two2", "2two", "xtwo", "_two", "two_", "+two#", "é two", "étwo", "twenty-one",
    "seventy", "often written", "١٢ and ٣", "a1b22c333", "ten, twelve; 12 half a dozen", "nine9 nine",
    "thousand\ntwice\tfour five", "x²", "½ half", "c#two", "two#", "a+two+b", "#nine#", "no digits, no words",
    "twos and tens", "ten.", "(seven)", "about 7", "٣ only", "twentyé",
])
def test_number_count_equals_the_single_pattern(text):
    # `_numbers` counts digit runs and number words apart, and skips the searches that cannot
    # find anything: the same as NUMBER's first three matches, with or without the words known.
    from drafter.traces.domain import NUMBER, WORD, _numbers

    want = min(3, len(NUMBER.findall(text)))
    assert _numbers(text) == want
    assert _numbers(text, set(WORD.findall(text))) == want


def test_classify_text_remembers_only_the_sample():
    from drafter.traces.domain import SAMPLE_CHARS, _classify_sample

    code = "Write a Python function that returns the sum of a list.\n```python\ndef f(xs):\n    return sum(xs)\n```"
    chat = "Tell me about the history of tea in a few sentences. " * 2
    assert classify_text(code) == "code" and classify_text(chat) == "chat"
    assert classify_text(code) == "code"  # a cached answer is the same
    # Text past the sample never changes the tag (it is all the cache keys on).
    assert classify_text(chat + " " * SAMPLE_CHARS + code * 30) == classify_text(chat)
    assert _classify_sample.cache_info().hits >= 1


EDGE_CASES = [
    "WRITE A PYTHON FUNCTION that sorts", "Fix The Bug in my code", "x =\x1c5", "for\x1f(i=0;", "a\r\nb;\r\n",
    "end with {\nnext", "if (a < b) {", "What Is -3 plus 4?", "$x^2$ and \\frac{1}{2}", "5 %", "a->b", "obj.method(",
    "tabs\tand\x0bvertical\x0cfeeds 3\t+\t4", "_snake(", "Sample Input\n1 2", "", "no signs at all here",
    # word boundaries of the counted words: `WORD` runs of [a-z+#] that start with a letter
    "c++ and c# and c+++ and c##", "#include <x>", "a#python ++python python# Python PYTHON", "python\n",
    "python python\npython", "x1python2y", "sum_total find_all", "half-half", "two", "I", "a b", "a1b", "+ #",
    "c++c++ c#c#", "what's 2+2", "in python, in rust;",
]


def test_one_hyperscan_pass_finds_what_each_pattern_finds(monkeypatch):
    """ASCII samples are scanned once by Hyperscan for every pattern; each pattern must be found
    exactly where `re` finds it (code and maths signs in the text, the task and word-problem
    patterns in its lowercased form), on real prompts and answers and on edge cases."""
    pytest.importorskip("hyperscan")
    from drafter.traces.demo import sharegpt_path
    from drafter.traces.domain import (CODE_WORDS, COUNTED, COUNTED_WORDS, MATH_WORDS, SAMPLE_CHARS, SCANNED, TASK_ID,
                                       TWO_WORDS_ID, WORD, WORD_BASE, _scan)
    from drafter.traces.sources import SourceReader

    texts = [p for name in ("gsm8k", "math500", "humaneval", "mbpp", "livecodebench", "mt-bench") for p in first_turns(name)]
    for rec in SourceReader(sharegpt_path(), max_line_bytes=50_000_000).records():
        texts += [str(t.get("value", "")) for t in (rec.obj or {}).get("conversations", [])]
        if len(texts) > 6000:
            break
    scanned = 0
    for text in [t[:SAMPLE_CHARS] for t in texts] + EDGE_CASES:
        found = _scan(text)
        if not text.isascii() or any(c in text for c in "\x1c\x1d\x1e\x1f"):
            assert found is None  # searched with `re`
            continue
        want = {i for i, rx in enumerate(SCANNED) if rx.search(text if i < TASK_ID else text.lower())}
        assert {i for i in found if i < WORD_BASE} == want, text
        # the counted words (code and maths words at every occurrence, the others once) and
        # "two words", as `WORD` finds them
        words = WORD.findall(text.lower())
        repeated = CODE_WORDS | MATH_WORDS
        want_words = Counter(w for w in words if w in repeated) + Counter({w for w in words if w in COUNTED - repeated})
        assert Counter(COUNTED_WORDS[i - WORD_BASE] for i in found if WORD_BASE <= i < TWO_WORDS_ID) == want_words, text
        assert (TWO_WORDS_ID in found) == (len(words) >= 2), text
        scanned += 1
    assert scanned > 5000
    # and the scores are those of searching each pattern with `re`
    from drafter.traces import domain

    samples = [t[:SAMPLE_CHARS] for t in texts] + EDGE_CASES
    fast = [domain.scores(t) for t in samples]
    tags = [domain._classify_sample.__wrapped__(t) for t in samples]
    monkeypatch.setattr(domain, "hyperscan", None)
    assert fast == [domain.scores(t) for t in samples]
    assert tags == [domain._classify_sample.__wrapped__(t) for t in samples]
    assert sum(code >= 6 for code, _, _ in fast) > 100 and sum(task for _, _, task in fast) > 50


@pytest.mark.parametrize("text, code", [
    ("python java sql html css bash json", 6 + 6),  # programming words: 1 each, at most 6; tech words: 3 each, at most 6
    ("python python python code", 4 + 3),  # repeats count
    ("help me with my code please, in python", 6 + 2 + 3),  # "in <language>" asks for a program
])
def test_code_score_of_words(text, code):
    from drafter.traces.domain import scores

    assert scores(text)[0] == code
