"""In-memory training data from a tiny target's `capture`, for the drafter tests.

The cache stage writes the real thing; these tests only need the same sample dicts
(`input_ids`, `loss_mask`, `features`, `final_hidden`) and a collate into TrainBatch.
A random tiny target is nearly uniform, which would make every drafter look good, and
with tied embeddings it just repeats its input token. `sharp_target` gives it its own
random, scaled LM head: its next-token distributions become peaked and follow a random
function of the context, while its hidden states stay as they are. Sequences are the target's own sampled
continuations of random prompts (like regenerated data): learnable, not noise.
"""

from __future__ import annotations

import torch

from drafter.config import TargetConfig, TinyTargetConfig
from drafter.models import TrainBatch
from drafter.target import load_target


def sharp_target(seed: int = 0, sharpness: float = 30.0, shape: str = "llama", dtype: str = "float32"):
    target = load_target(TargetConfig(source="tiny", dtype=dtype, tiny=TinyTargetConfig(shape=shape, seed=seed)))
    head = target.model.get_output_embeddings()
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(head.weight.shape, generator=gen) * 0.02 * sharpness
    head.weight = torch.nn.Parameter(weight.to(head.weight.dtype), requires_grad=False)
    return target


class MemoryDataset:
    def __init__(self, samples: list[dict[str, torch.Tensor]], meta: dict) -> None:
        self.samples, self.meta = samples, meta

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


@torch.no_grad()
def make_dataset(target, n: int, prompt_len: int = 6, answer_len: int = 30, seed: int = 0) -> MemoryDataset:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, target.vocab_size, (n, prompt_len), generator=gen)
    out = target.model(ids, use_cache=True)
    for _ in range(answer_len):  # the target's own answer, sampled at temperature 1
        nxt = torch.multinomial(torch.softmax(out.logits[:, -1], -1), 1, generator=gen)
        ids = torch.cat([ids, nxt], 1)
        out = target.model(nxt, past_key_values=out.past_key_values, use_cache=True)
    feats = target.capture(ids)
    samples = []
    for i in range(n):
        # ragged lengths exercise padding: drop a few trailing tokens from some sequences
        length = ids.shape[1] - (i % 3) * 2
        mask = torch.zeros(length, dtype=torch.bool)
        mask[prompt_len:] = True
        samples.append({
            "input_ids": ids[i, :length].clone(),
            "loss_mask": mask,
            "features": feats.layers[i, :length].clone(),
            "final_hidden": feats.final[i, :length].clone(),
        })
    meta = {"layer_ids": list(target.layer_ids), "target_fingerprint": target.fingerprint,
            "hidden_size": target.hidden_size}
    return MemoryDataset(samples, meta)


def collate(samples: list[dict[str, torch.Tensor]]) -> TrainBatch:
    """Right-pad to the longest sample."""
    T = max(s["input_ids"].shape[0] for s in samples)
    b = len(samples)
    n, H = samples[0]["features"].shape[1:]
    out = TrainBatch(
        input_ids=torch.zeros(b, T, dtype=torch.long),
        loss_mask=torch.zeros(b, T, dtype=torch.bool),
        attention_mask=torch.zeros(b, T, dtype=torch.bool),
        features=torch.zeros(b, T, n, H),
        final_hidden=torch.zeros(b, T, H),
    )
    for i, s in enumerate(samples):
        t = s["input_ids"].shape[0]
        out.input_ids[i, :t] = s["input_ids"]
        out.loss_mask[i, :t] = s["loss_mask"]
        out.attention_mask[i, :t] = True
        out.features[i, :t] = s["features"]
        out.final_hidden[i, :t] = s["final_hidden"]
    return out
