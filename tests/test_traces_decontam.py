"""Decontamination against evaluation prompts: n-gram overlap, short prompts, boilerplate."""

import json
import random

import pytest

from drafter.traces.decontam import BOILERPLATE_PROMPTS, EvalIndex
from drafter.traces.dedup import normalize

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega apple river stone cloud").split()


BOILER = "you are an expert python programmer and here is your task for today please"


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def sets(tmp_path):
    rng = random.Random(0)
    files = {
        "math": [sentence(rng, 30), sentence(rng, 20), "What is 2 plus 2?"],
        "code": [sentence(rng, 25), *(f"{BOILER} {sentence(rng, 8)}" for _ in range(6))],
    }
    for name, prompts in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in prompts))
    return tmp_path, files


def reference(index_files, texts, n=13):
    """Brute force: the first text (in order) sharing an n-gram with a non-boilerplate prompt."""
    prompts = [(name, normalize(p).split()) for name in sorted(index_files) for p in index_files[name]]
    grams = [{tuple(w[i : i + n]) for i in range(len(w) - n + 1)} for _, w in prompts]
    df = {}
    for prompt_grams in grams:
        for g in prompt_grams:
            df[g] = df.get(g, 0) + 1
    for text in texts:
        words = text.split()
        for name, w in prompts:
            if len(w) < n and words == w:
                return name
        for i in range(len(words) - n + 1):
            g = tuple(words[i : i + n])
            for (name, _), prompt_grams in zip(prompts, grams):  # files in name order, as the index reads them
                if g in prompt_grams and df[g] < BOILERPLATE_PROMPTS:
                    return name
    return None


def test_overlap_short_prompts_boilerplate_and_order(sets):
    folder, files = sets
    index = EvalIndex([folder])
    assert index.names == ["code", "math"] and index.boilerplate > 0
    m0 = normalize(files["math"][0]).split()
    c0 = normalize(files["code"][0]).split()
    conversations = [
        ["hello there " + " ".join(m0[3:16]) + " thanks"],  # 13 words of a math prompt
        ["hello there " + " ".join(m0[3:15]) + " thanks"],  # only 12: no overlap
        [normalize("What is 2 plus 2?")],  # a short prompt, matched exactly
        [normalize("What is 2 plus 2 and 3?")],  # not the short prompt
        ["zzz " + normalize(BOILER) + " zzz"],  # shares only the boilerplate (in 6 prompts)
        ["nothing here", " ".join(c0[:13]), " ".join(m0[:13])],  # the first overlapping text decides
        [],
    ]
    got = [index.match(c) for c in conversations]
    assert got == ["math", None, "math", None, None, "code", None]
    assert got == [reference(files, c) for c in conversations]


@pytest.mark.parametrize("bits,compiled", [(8, True), (None, True), (None, False)])
def test_agrees_with_brute_force_on_random_texts(sets, monkeypatch, bits, compiled):
    # The probe filter only spares scans: with 8 bits (every probe passes) the answers are the same.
    # So are those of the Python keys and probes (where _keys.c was not built).
    import drafter.traces.decontam as decontam

    if bits:
        monkeypatch.setattr(decontam, "PROBE_BITS", bits)
    if not compiled:
        monkeypatch.setattr(decontam, "_keys", None)
    folder, files = sets
    index = EvalIndex([folder])
    rng = random.Random(1)
    pool = [normalize(p).split() for ps in files.values() for p in ps]
    conversations = []
    for _ in range(200):
        texts = []
        for _ in range(rng.randint(1, 3)):
            words = rng.choice(pool)
            start = rng.randint(0, max(0, len(words) - 10))
            texts.append(" ".join(sentence(rng, rng.randint(0, 4)).split() + words[start : start + rng.randint(5, 16)]))
        conversations.append(texts)
    got = [index.match(c) for c in conversations]
    assert got == [reference(files, c) for c in conversations]
    assert 20 < sum(g is not None for g in got) < 180  # both outcomes are exercised


@pytest.mark.parametrize("n", [4, 7, 13])
def test_an_overlap_is_found_at_every_offset_whatever_n(sets, n):
    """Texts are probed at every few words before being scanned: an evaluation n-gram must be
    found wherever it starts in the text, and a window one word short of it never."""
    folder, files = sets
    index = EvalIndex([folder], n=n)
    words = normalize(files["math"][0]).split()
    rng = random.Random(2)
    for lead in range(2 * n + 1):
        filler = sentence(rng, lead).split()
        for start in (0, 5, len(words) - n):
            gram = words[start : start + n]
            assert index.match([" ".join(filler + gram + ["omega"])]) == "math", (lead, start)
            assert index.match([" ".join(filler + gram[1:] + ["zzz"])]) == reference(files, [" ".join(filler + gram[1:] + ["zzz"])], n)


def test_the_c_grams_and_probes_are_those_of_python(sets):
    # _keys.c splits at ASCII whitespace as bytes.split does (runs of it, tabs, newlines: grams are
    # then copied, not sliced), keys the grams and probes the filter as the Python definitions do.
    from drafter.traces import decontam

    assert decontam._keys is not None, "drafter/traces/_keys.c was not built (pip install -e . builds it)"
    rng = random.Random(5)
    spaces = [" ", " ", " ", "  ", "\t", "\n ", "\r\x0b\x0c"]
    vocab = [*WORDS, "ça", "東京", "x" * 40, "a_b", "42"]
    texts = ["", " ", "one", *("".join(rng.choice(vocab) + rng.choice(spaces) for _ in range(rng.randrange(0, 60)))
                              for _ in range(300))]
    texts += [normalize(t) for t in texts]
    for width, stride in [(13, 1), (7, 7), (1, 1), (3, 2)]:
        c, py = decontam.gram_keys(texts, width, stride), decontam.gram_keys_py(texts, width, stride)
        assert c[0].tolist() == py[0].tolist() and c[1].tolist() == py[1].tolist()
    folder, files = sets
    index = EvalIndex([folder])
    # the evaluation prompts' own words (probes that hit), the texts above (most of which miss)
    texts += [" ".join(sentence(rng, 3).split() + normalize(p).split()[:20]) for ps in files.values() for p in ps]
    codes = decontam._keys.probe(texts, index.n, index.k, index.stride, index.probe_bits)
    assert codes == decontam.probe_py(texts, index.n, index.k, index.stride, index.probe_bits)
    assert set(codes) == {0, 1, 2}
    with pytest.raises(ValueError, match="power of two"):
        decontam._keys.probe(texts, 13, 7, 7, b"abc")
