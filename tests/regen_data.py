"""Inputs for the regeneration and cache tests: ingested splits as the ingest stage writes them."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = [
    "Write a python function to reverse a string.",
    "What is the capital of France?",
    "Explain what a binary search does.",
    "How many legs does a spider have?",
    "Give me a haiku about autumn.",
    "What is 17 times 3?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does HTTP stand for?",
    "Sort the list [3, 1, 2] in ascending order.",
    "Summarise the plot of Hamlet in one sentence.",
]


def conversation(i: int, turns: int = 1, system: bool = False, trailing_user: bool = False) -> dict:
    messages = [{"role": "system", "content": "You are a concise assistant."}] if system else []
    for t in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[(i + t) % len(QUESTIONS)]})
        messages.append({"role": "assistant", "content": f"original answer {i}.{t} from the logs"})
    if trailing_user:
        messages.append({"role": "user", "content": "Thanks!"})
    return {
        "id": f"conv-{i:04d}",
        "source": "logs/day1.jsonl",
        "line": i + 1,
        "timestamp": "2026-11-20T10:00:00+00:00",
        "model": "SmolLM2-135M-Instruct",
        "tenant": "acme",
        "route": None,
        "domain": ["chat", "code", "math", "other"][i % 4],
        "messages": messages,
    }


def make_rows(n: int, start: int = 0) -> list[dict]:
    """A mix: single- and multi-turn, with and without system prompt, a trailing user turn."""
    return [
        conversation(i, turns=1 + (i % 3 == 1), system=i % 2 == 0, trailing_user=i % 5 == 3)
        for i in range(start, start + n)
    ]


def write_ingested(root: Path, train: list[dict], holdout: list[dict]) -> Path:
    from datasets import Dataset

    root.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(train).save_to_disk(str(root / "train"))
    Dataset.from_list(holdout).save_to_disk(str(root / "holdout"))
    (root / "manifest.json").write_text(json.dumps({"stage": "ingest"}))
    return root


def write_regenerated(root: Path, splits: dict[str, list[dict]]) -> Path:
    """Regenerated JSONL splits written directly (cache tests need no generation)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with (root / f"{split}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    (root / "manifest.json").write_text(json.dumps({"stage": "regenerate"}))
    return root
