"""Tiny targets for tests: random-initialised Llama-, Qwen3- and Gemma3-shaped models.

They go through exactly the same `Target` API as real ones but load in well under a
second. Their tokenizer is a small byte-level BPE trained in-process on the bundled
evaluation prompts (deterministic, offline), with a ChatML chat template, so chat
formatting, loss masks and regeneration behave as with a real instruct model.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from drafter.config import BUNDLED_EVAL_DIR, TinyTargetConfig

TINY_VOCAB = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    texts = []
    for path in sorted(BUNDLED_EVAL_DIR.glob("*.jsonl")):
        with path.open() as f:
            for i, line in enumerate(f):
                if i >= 200:
                    break
                texts.extend(json.loads(line)["turns"])
    return texts


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 512-token byte-level BPE tokenizer with ChatML special tokens (built once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        mask_token="<|mask|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(cfg: TinyTargetConfig, vocab_size: int):
    """A random *ForCausalLM of the given shape, seeded, in eval mode."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,  # <|im_end|> in the tiny tokenizer
        pad_token_id=0,
    )
    head_dim = cfg.hidden_size // cfg.num_heads
    if cfg.shape == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif cfg.shape == "qwen3":
        config, cls = Qwen3Config(**common, head_dim=head_dim), Qwen3ForCausalLM
    else:
        # Gemma3 keeps its quirks: scaled embeddings, sliding-window layers, logit soft-capping.
        config = Gemma3TextConfig(
            **common, head_dim=head_dim, sliding_window=64, final_logit_softcapping=30.0
        )
        cls = Gemma3ForCausalLM
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        model = cls(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval()
