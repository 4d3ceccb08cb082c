"""Chat-template rendering and the assistant-token loss mask, derived from the template.

Regeneration and the cache both render conversations with the target's own chat
template (thinking disabled where the template has that switch), exactly as a serving
engine does, so the drafter trains on the token sequences it will see in production.

The loss mask marks the tokens the target generated: each assistant message's content
and the end-of-turn token that closes it (e.g. `<|im_end|>`), never the headers the
template writes around them. It is found without per-template rules: the conversation
is rendered once with a unique sentinel in place of every message's content, which
locates each content span in the rendered text unambiguously; the real text is then
rebuilt around those spans and must equal the real rendering. A mask that comes out
all zero while the conversation has assistant text is a template mismatch and fails
loudly (`LossMaskError`): the classic way these pipelines silently train on nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Collection

from drafter.errors import DrafterError


class ChatTemplateError(DrafterError, ValueError):
    """The target's chat template cannot render this conversation (or there is none)."""


class LossMaskError(DrafterError, RuntimeError):
    """An assistant-token mask came out all zero: training would learn nothing."""


_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
# How templates commonly transform content before printing it; tried in this order.
_CONTENT_VARIANTS = (lambda s: s, str.strip, lambda s: s.lstrip("\n"))


def template_kwargs(tokenizer: Any, enable_thinking: bool = False) -> dict[str, Any]:
    """Extra template variables: the thinking switch, only where the template reads it."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"enable_thinking": enable_thinking} if "enable_thinking" in template else {}


def render(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = False
) -> str:
    """The conversation as the target's chat template writes it (a string, not ids)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the target's tokenizer has no chat template; regeneration and the cache need one")
    try:
        return tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs(tokenizer, enable_thinking),
        )
    except Exception as exc:  # jinja raises TemplateError (e.g. roles must alternate) and friends
        raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from exc


def prompt_ids(tokenizer: Any, messages: list[dict], enable_thinking: bool = False) -> list[int]:
    """Token ids of a generation prompt (history + assistant header), as a server builds it."""
    text = render(tokenizer, messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_strings(tokenizer: Any, eos_token_ids: list[int] | None = None) -> list[str]:
    """The token strings that close a generated turn (EOS of the tokenizer and of the model)."""
    ends = [tokenizer.convert_ids_to_tokens(i) for i in (eos_token_ids or [])]
    if getattr(tokenizer, "eos_token", None):
        ends.append(tokenizer.eos_token)
    return sorted({e for e in ends if e}, key=len, reverse=True)


@dataclass
class ChatEncoding:
    input_ids: list[int]
    loss_mask: list[bool]  # True on assistant tokens (content + closing end-of-turn token)
    text: str


def _assistant_spans(
    tokenizer: Any, messages: list[dict], text: str, end_strings: list[str], enable_thinking: bool,
    unfinished: Collection[int] = (),
) -> list[tuple[int, int]]:
    """Character spans of assistant content (plus its end-of-turn token) in `text`."""
    masked = [{"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    skeleton = render(tokenizer, masked, enable_thinking=enable_thinking)
    for variant in _CONTENT_VARIANTS:
        rebuilt, spans, last = [], [], 0
        length = 0
        for match in _SENTINEL_RE.finditer(skeleton):
            i = int(match.group(1))
            rebuilt.append(skeleton[last : match.start()])
            length += match.start() - last
            content = variant(messages[i]["content"] or "")
            if messages[i]["role"] == "assistant":
                spans.append((length, length + len(content)))
            rebuilt.append(content)
            length += len(content)
            last = match.end()
        rebuilt.append(skeleton[last:])
        if "".join(rebuilt) == text:
            break
    else:
        raise ChatTemplateError(
            "cannot locate the messages in the rendered conversation (the template rewrites "
            "their content in a way this pipeline does not recognise)"
        )
    out = []
    for k, (start, end) in enumerate(spans):
        for marker in end_strings if k not in unfinished else ():
            if text.startswith(marker, end):
                end += len(marker)
                break
        if end > start:
            out.append((start, end))
    return out


def encode(
    tokenizer: Any,
    messages: list[dict],
    end_strings: list[str] | None = None,
    enable_thinking: bool = False,
    unfinished: Collection[int] = (),
) -> ChatEncoding:
    """Token ids of a whole conversation and its assistant-token loss mask.

    `unfinished`: positions (0 = first assistant message) of answers cut off at the token
    limit; the end-of-turn token the template writes after them was not generated by
    the target, so it is not masked.

    Raises `LossMaskError` when the conversation has assistant text but no token is
    masked, and `ChatTemplateError` when the template cannot render it.
    """
    if end_strings is None:
        end_strings = end_of_turn_strings(tokenizer)
    text = render(tokenizer, messages, enable_thinking=enable_thinking)
    spans = _assistant_spans(tokenizer, messages, text, end_strings, enable_thinking, unfinished)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for start, end in enc["offset_mapping"]:
        mask.append(any(start < s_end and end > s_start for s_start, s_end in spans))
    has_assistant_text = any(m["role"] == "assistant" and (m["content"] or "").strip() for m in messages)
    if has_assistant_text and not any(mask):
        raise LossMaskError(
            "the assistant-token loss mask is all zero although the conversation has assistant "
            "answers: the chat template and the mask disagree, training would learn nothing"
        )
    return ChatEncoding(input_ids=list(enc["input_ids"]), loss_mask=mask, text=text)


def check_template(tokenizer: Any, end_strings: list[str] | None = None, enable_thinking: bool = False) -> None:
    """Probe the template once before a long run: masked tokens must be exactly the answers."""
    answers = ["The capital of France is Paris.", "Two plus two is four."]
    probe = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "And what is two plus two?"},
        {"role": "assistant", "content": answers[1]},
    ]
    enc = encode(tokenizer, probe, end_strings, enable_thinking)
    masked = tokenizer.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m], skip_special_tokens=True)
    if masked.replace(" ", "") != "".join(answers).replace(" ", ""):
        raise LossMaskError(
            f"the loss mask of a probe conversation covers {masked!r}, expected the two answers "
            f"{answers!r}: the mask does not match this chat template"
        )
