"""Chat rendering and the assistant-token loss mask derived from the chat template."""

import copy

import pytest

from drafter import chat
from drafter.tiny import tiny_tokenizer

# The shape of Qwen3's template: a thinking switch, an empty think block on the last
# assistant turn, content rewritten (split on </think>, newlines stripped).
QWEN3_LIKE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' or message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- if loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Gemma's shape: the system prompt folded into the first user turn, content trimmed.
GEMMA_LIKE = (
    "{%- set ns = namespace(prefix='') %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{%- set ns.prefix = message.content | trim + '\\n\\n' %}"
    "{%- else %}"
    "{{- '<|im_start|>' + ('model' if message.role == 'assistant' else 'user') + '\\n' }}"
    "{%- if message.role == 'user' %}{{- ns.prefix }}{%- set ns.prefix = '' %}{%- endif %}"
    "{{- message.content | trim + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>model\\n' }}{%- endif %}"
)
# A template that forgets assistant messages: the mask must not silently come out empty.
DROPS_ASSISTANT = (
    "{%- for message in messages %}{%- if message.role != 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
)

CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "\nRome, of course.  "},
]


def with_template(template):
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = template
    return tok


def masked_runs(tok, enc):
    """The masked tokens, decoded as contiguous runs."""
    runs, current = [], []
    for token, m in zip(enc.input_ids, enc.loss_mask):
        if m:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_mask_is_exactly_the_answers_and_their_end_token():
    tok = tiny_tokenizer()
    enc = chat.encode(tok, CONV)
    assert masked_runs(tok, enc) == ["Paris.<|im_end|>", "\nRome, of course.  <|im_end|>"]
    # The ids are what the template + tokenizer give (what a server feeds the model).
    assert enc.input_ids == tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]


def test_answers_cut_off_at_the_limit_do_not_teach_the_end_token():
    tok = tiny_tokenizer()
    enc = chat.encode(tok, CONV, unfinished={1})
    assert masked_runs(tok, enc) == ["Paris.<|im_end|>", "\nRome, of course.  "]


def test_content_that_looks_like_the_template_is_still_masked_right():
    tok = tiny_tokenizer()
    conv = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"},
            {"role": "user", "content": "<|im_start|>"}, {"role": "assistant", "content": "a"}]
    assert masked_runs(tok, chat.encode(tok, conv)) == ["assistant<|im_end|>", "a<|im_end|>"]


def test_thinking_template_switch_and_mask():
    tok = with_template(QWEN3_LIKE)
    assert chat.template_kwargs(tok) == {"enable_thinking": False}
    assert chat.template_kwargs(tiny_tokenizer()) == {}
    prompt = chat.render(tok, CONV[:2], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking disabled
    enc = chat.encode(tok, CONV)
    # The empty think block of the last turn is template text, not the answer.
    assert masked_runs(tok, enc) == ["Paris.<|im_end|>", "Rome, of course.  <|im_end|>"]
    chat.check_template(tok)


def test_trimming_template_with_folded_system_prompt():
    tok = with_template(GEMMA_LIKE)
    enc = chat.encode(tok, CONV)
    assert masked_runs(tok, enc) == ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
    assert "Answer briefly." in enc.text
    chat.check_template(tok)


def test_all_zero_mask_fails_loudly():
    tok = with_template(DROPS_ASSISTANT)
    with pytest.raises(chat.LossMaskError, match="all zero"):
        chat.encode(tok, CONV)
    with pytest.raises(chat.LossMaskError):
        chat.check_template(tok)
    # No assistant text at all is not an error: there is nothing to mask.
    enc = chat.encode(tiny_tokenizer(), [{"role": "user", "content": "hi"}])
    assert enc.input_ids and not any(enc.loss_mask)


def test_template_that_rewrites_content_unrecognisably_is_an_error():
    tok = with_template(QWEN3_LIKE.replace("content + '<|im_end|>", "content | upper + '<|im_end|>"))
    with pytest.raises(chat.ChatTemplateError, match="cannot locate"):
        chat.encode(tok, CONV)


def test_no_template_is_a_clear_error():
    tok = with_template(None)
    with pytest.raises(chat.ChatTemplateError, match="no chat template"):
        chat.render(tok, CONV)


def test_prompt_ids_end_with_the_assistant_header():
    tok = tiny_tokenizer()
    ids = chat.prompt_ids(tok, CONV[:2])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids).startswith("<|im_start|>system\nAnswer briefly.")


@pytest.mark.integration
def test_smollm2_template_mask():
    """The real SmolLM2 template injects a default system prompt when there is none."""
    from drafter.config import load_config
    from drafter.target import load_tokenizer
    from tests.conftest import ROOT

    tok = load_tokenizer(load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml"))
    chat.check_template(tok)
    enc = chat.encode(tok, CONV[1:])
    assert "You are a helpful AI assistant named SmolLM" in enc.text
    assert masked_runs(tok, enc) == ["Paris.<|im_end|>", "\nRome, of course.  <|im_end|>"]
