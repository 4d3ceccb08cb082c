"""Drafters for testing the engine, the calibration and the scheduler before (and beside)
the trained algorithms. Each implements `drafter.models.base.DraftModel` honestly: the
probabilities it returns are exactly the ones its tokens were drawn from.

- `LMDrafter`: any causal LM sharing the target's vocabulary, used as a sequential draft
  model with its own KV cache (a perturbed copy of a tiny target gives partial
  acceptance; the target itself gives acceptance ~1). Optional confidences: the draft's
  own max probability, optionally made over-confident on purpose (calibration tests).
- `ScriptedDrafter`: proposes a known continuation (e.g. the target's greedy answer)
  with random corruptions whose per-position rate is drawn before the token and reported
  as the confidence: partial acceptance and an informative, honest confidence signal on a
  real target at the cost of a table lookup (greedy tests and scheduler benchmarks).
- `RandomDrafter`: uniform random tokens (acceptance ~1/V).
- `BigramDrafter`: a fixed bigram table; microseconds a proposal, so statistical tests
  can afford tens of thousands of samples. Exportable and registered as `test-bigram`
  to exercise loading a drafter from a folder.
- `RecordingDrafter`: wraps another and records every `extend` call (contract checks).
"""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from drafter.models import register
from drafter.models.base import DraftModel, Proposal
from drafter.models.metrics import GREEDY_BELOW


def _draw(logits: torch.Tensor, temperature: float, generator) -> tuple[int, torch.Tensor]:
    """One token and the exact distribution it came from (one-hot argmax at T=0)."""
    if temperature == 0:
        probs = torch.zeros_like(logits, dtype=torch.float32)
        token = int(logits.argmax())
        probs[token] = 1.0
        return token, probs
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


class LMDrafter(DraftModel):
    algorithm = "test-lm"

    def __init__(self, model: nn.Module, confidence: str | None = None, overconfidence: float = 1.0, shift: float = 0.0):
        super().__init__({"block_size": 7}, heads=None)
        self.lm = model.eval()
        self.confidence = confidence  # None | "maxprob"
        self.overconfidence, self.shift = overconfidence, shift

    def init_state(self) -> dict[str, Any]:
        return {"cache": DynamicCache(), "length": 0}

    @torch.inference_mode()
    def extend(self, state, features, input_ids) -> None:
        self.lm(input_ids=input_ids, past_key_values=state["cache"], use_cache=True)
        state["length"] += input_ids.shape[1]

    @torch.inference_mode()
    def propose(self, state, anchor, gamma, temperature, generator=None) -> Proposal:
        cache, tokens, probs, confs = state["cache"], [], [], []
        token = int(anchor.reshape(-1)[0])
        for _ in range(gamma):
            logits = self.lm(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]
            if self.confidence == "maxprob":
                # Depends only on the drafted prefix, never on the token sampled here.
                top = torch.softmax(logits.float(), -1).max().clamp(1e-6, 1 - 1e-6)
                z = torch.log(top) - torch.log1p(-top)
                confs.append(torch.sigmoid(self.overconfidence * z + self.shift))
            token, p = _draw(logits, temperature, generator)
            tokens.append(token)
            probs.append(p)
        cache.crop(-gamma)  # propose leaves the confirmed state unchanged
        return Proposal(
            tokens=torch.tensor([tokens]),
            probs=torch.stack(probs)[None],
            confidences=torch.stack(confs)[None] if confs else None,
        )


class RandomDrafter(DraftModel):
    algorithm = "test-random"

    def __init__(self, vocab_size: int):
        super().__init__({}, heads=None)
        self.vocab_size = vocab_size

    def init_state(self):
        return None

    def extend(self, state, features, input_ids) -> None:
        pass

    def propose(self, state, anchor, gamma, temperature, generator=None) -> Proposal:
        tokens = torch.randint(self.vocab_size, (1, gamma), generator=generator)
        if temperature == 0:
            probs = torch.nn.functional.one_hot(tokens, self.vocab_size).float()
        else:
            probs = torch.full((1, gamma, self.vocab_size), 1.0 / self.vocab_size)
        return Proposal(tokens=tokens, probs=probs)


@register
class BigramDrafter(DraftModel):
    """p_d(x_k | x_{k-1}) = softmax(log table[x_{k-1}] / T); the anchor starts the chain."""

    algorithm = "test-bigram"

    def __init__(self, table: torch.Tensor, heads=None, confidences: bool = False):
        super().__init__({"vocab_size": table.shape[0]}, heads)
        self.log_table = torch.log(table / table.sum(-1, keepdim=True))
        self.with_confidences = confidences

    @classmethod
    def random(cls, vocab_size: int, seed: int = 0, concentration: float = 0.3, **kw) -> BigramDrafter:
        import numpy as np

        rows = np.random.default_rng(seed).dirichlet(np.full(vocab_size, concentration), size=vocab_size)
        return cls(torch.tensor(rows, dtype=torch.float32) + 1e-4, **kw)

    def init_state(self):
        return None

    def extend(self, state, features, input_ids) -> None:
        pass

    def propose(self, state, anchor, gamma, temperature, generator=None) -> Proposal:
        prev, tokens, probs, confs = int(anchor.reshape(-1)[0]), [], [], []
        for _ in range(gamma):
            logits = self.log_table[prev]
            confs.append(logits.exp().max())
            prev, p = _draw(logits, temperature, generator)
            tokens.append(prev)
            probs.append(p)
        return Proposal(
            tokens=torch.tensor([tokens]),
            probs=torch.stack(probs)[None],
            confidences=torch.stack(confs)[None] if self.with_confidences else None,
        )

    def export(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({"log_table": self.log_table.contiguous()}, str(out_dir / "model.safetensors"))
        config = {"speculators_model_type": self.algorithm, "block_size": 4, "confidences": self.with_confidences}
        (out_dir / "config.json").write_text(json.dumps(config))
        return out_dir

    @classmethod
    def load(cls, path: Path, heads) -> BigramDrafter:
        config = json.loads((Path(path) / "config.json").read_text())
        table = load_file(str(Path(path) / "model.safetensors"))["log_table"].exp()
        out = cls(table, heads=heads, confidences=config.get("confidences", False))
        out.config = config
        return out


class ScriptedDrafter(DraftModel):
    """Proposes `script[prompt]` continued from the current position, each token replaced by a
    uniform random one with probability q_k ~ Beta(a, b) drawn per position before the
    token. The confidence is 1 - q_k (mixed with the chance a random token is right), so
    it depends on the drafted prefix only, as a confidence head's does; the probabilities
    are the exact mixture each token is drawn from, so the engine stays lossless.

    `draws_seed` (greedy benchmarks): q_k, the corruption coin and the random token of each
    position of a request's answer are fixed in advance from (seed, prompt, position), not drawn
    in call order. Policies that verify different drafts then face the same draft at every
    position, so comparing them is not comparing two runs of luck (common random numbers)."""

    algorithm = "test-scripted"

    def __init__(
        self,
        scripts: dict[tuple[int, ...], list[int]],
        vocab_size: int,
        error: tuple[float, float] = (1.0, 3.0),
        overconfidence: float = 1.0,
        shift: float = 0.0,
        resync: Callable[[list[int]], list[int]] | None = None,
        draws_seed: int | None = None,
    ):
        super().__init__({}, heads=None)
        self.scripts, self.vocab_size = dict(scripts), vocab_size
        # When the emitted text leaves the script (in bf16 a verification block and a single
        # token can round a near-tie apart), `resync(ids)` gives the continuation from there.
        self.resync = resync
        self.error, self.error_params = torch.distributions.Beta(*error), error
        # A deliberately mis-calibrated head: sigmoid(overconfidence * logit(c) + shift).
        self.overconfidence, self.shift = overconfidence, shift
        self.prompts, self.draws_seed = list(self.scripts), draws_seed

    def _fixed_draws(self, state, ids: list[int], gamma: int) -> tuple[torch.Tensor, list[float], list[int]]:
        """(q, coins, random tokens) of the next gamma positions after the prompt, fixed per request."""
        if "draws" not in state:
            prompt = max((p for p in self.prompts if tuple(ids[: len(p)]) == p), key=len, default=())
            rng = np.random.default_rng([self.draws_seed, zlib.crc32(repr(prompt).encode())])
            n = 1 << 14
            state["draws"] = (len(prompt), torch.from_numpy(rng.beta(*self.error_params, n)).float(),
                              rng.random(n).tolist(), rng.integers(self.vocab_size, size=n).tolist())
        start, q, coins, toks = state["draws"]
        at = len(ids) - start
        return q[at : at + gamma], coins[at : at + gamma], toks[at : at + gamma]

    def init_state(self):
        return {"ids": []}

    def extend(self, state, features, input_ids) -> None:
        state["ids"] += input_ids.reshape(-1).tolist()

    def _script(self, ids: list[int]) -> tuple[list[int], int]:
        """The script for `ids` (the longest matching prefix) and the offset of the next token."""
        found = max((p for p in self.scripts if tuple(ids[: len(p)]) == p), key=len, default=None)
        if found is None:
            return [], 0
        answer, offset = self.scripts[found], len(ids) - len(found)
        if self.resync is not None and ids[len(found):] != answer[:offset]:
            answer, offset = self.resync(ids), 0
            self.scripts[tuple(ids)] = answer
        return answer, offset

    def propose(self, state, anchor, gamma, temperature, generator=None) -> Proposal:
        ids = state["ids"] + [int(anchor.reshape(-1)[0])]
        answer, offset = self._script(ids)
        fixed = self._fixed_draws(state, ids, gamma) if self.draws_seed is not None else None
        q = fixed[0] if fixed else self.error.sample((gamma,))  # before any token: the confidence cannot see it
        tokens, probs = [], []
        for k in range(gamma):
            planned = answer[offset + k] if offset + k < len(answer) else 0
            if temperature > GREEDY_BELOW:  # greedy decoding reads no probabilities (a real drafter gives none)
                p = torch.full((self.vocab_size,), float(q[k]) / self.vocab_size)
                p[planned] += 1 - float(q[k])
                probs.append(p)
            # A draw from p without a pass over the vocabulary (cheap enough to leave the
            # engine's own costs in the engine benchmark): uniform with probability q, else planned.
            if fixed:
                tokens.append(fixed[2][k] if fixed[1][k] < float(q[k]) else planned)
                continue
            random_token = float(torch.rand((), generator=generator)) < float(q[k])
            tokens.append(int(torch.randint(self.vocab_size, (), generator=generator)) if random_token else planned)
        conf = ((1 - q) + q / self.vocab_size).clamp(1e-6, 1 - 1e-6)
        if self.overconfidence != 1.0 or self.shift:
            conf = torch.sigmoid(self.overconfidence * torch.logit(conf) + self.shift)
        return Proposal(tokens=torch.tensor([tokens]), probs=torch.stack(probs)[None] if probs else None,
                        confidences=conf[None])


class RecordingDrafter(DraftModel):
    algorithm = "test-recording"

    def __init__(self, inner: DraftModel):
        super().__init__({}, heads=None)
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def init_state(self):
        return self.inner.init_state()

    def extend(self, state, features, input_ids) -> None:
        self.calls.append((features.clone(), input_ids.clone()))
        self.inner.extend(state, features, input_ids)

    def propose(self, state, anchor, gamma, temperature, generator=None) -> Proposal:
        return self.inner.propose(state, anchor, gamma, temperature, generator)


# ----- draft language models from a target ---------------------------------------------
def perturbed_copy(model: nn.Module, noise: float, seed: int = 0) -> nn.Module:
    """The target with Gaussian noise (relative to each tensor's std) on every weight."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * noise * float(p.std()))
    return out.eval()


def tiny_vocab_target(vocab_size: int = 16, seed: int = 0, scale: float = 8.0):
    """A tiny Llama target over a vocabulary of `vocab_size` ids (no tokenizer), with peaked
    next-token distributions (LM head scaled) so that sampling tests have power."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from drafter.target import Target

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.generation_config.eos_token_id = None
    return Target(model=model, tokenizer=None, name=f"tiny-v{vocab_size}", layer_ids=[0, 1],
                  weights_hash="test", tokenizer_hash="none", template_hash="none")


def lively_target(shape: str = "llama", seed: int = 0):
    """A tiny target whose greedy answers vary (a freshly initialised one mostly repeats one
    token, which makes greedy-equality tests weak): random norm gains, stronger weights."""
    from drafter.config import TargetConfig, TinyTargetConfig
    from drafter.target import load_target

    target = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(shape=shape, seed=seed)))
    norm_scale, weight_scale = (3.0, 1.0) if shape == "gemma3" else (1.0, 10.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in target.model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * norm_scale)
            elif "embed" not in name:
                p.mul_(weight_scale)
    return target


def wide_bf16_target():
    """A tiny bf16 target with 32-wide heads (the smallest the CPU kernels take: drafter/attention.py,
    drafter/fused.py) whose greedy answers vary (stronger weights, as in `lively_target`)."""
    from drafter.config import TargetConfig, TinyTargetConfig
    from drafter.target import load_target

    target = load_target(TargetConfig(source="tiny", dtype="bfloat16", tiny=TinyTargetConfig(hidden_size=128, num_heads=4)))
    with torch.no_grad():
        for name, p in target.model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.mul_(10.0)
    return target
