"""EAGLE-3: a sequential one-layer drafter over fused target features (ALGORITHMS.md section 3).

At sequence position s the layer reads [norm(embed(x_s)) ; norm(h)] (2H wide) where h is
the fused target feature of position s-1, `fc(concat(feature layers))`, and predicts
x_{s+1}; its own output hidden state then replaces h for the next drafted token.
Training unrolls this k times (training-time test): at step i, index s, the input token
is the ground truth x_{s+i} (teacher forcing, as speculators/SpecForge), the hidden is
the step-(i-1) output, and attention sees the step-0 keys up to s plus the keys steps
1..i produced at s (`ttt_attention`): exactly what chain drafting sees at inference.
Loss: soft cross-entropy against the target distribution, weight ttt_decay**i (0.8).

Optional reduced draft vocabulary (`draft_vocab_size`): the N most frequent target tokens
of the training data (assistant tokens); `d2t[i]` = target id - i, `t2d` = bool mask over
the target vocabulary; the LM head is the frozen target head restricted to those rows;
the target distribution is renormalised over the draft vocabulary and positions whose
target argmax lies outside it are masked from the loss (the official recipe).

Deviations, and why:
- The fused features are all the cached feature layers (n*H -> H), DeepSpec's variant,
  so one target cache (default 5 layers) serves all three algorithms; the EAGLE-3
  paper fuses three (low/mid/high).
- Loss terms are averaged over all valid (position, step) pairs of the batch rather than
  per step, so sums across micro-batches and processes divide once (exact DDP).
- The draft layer's q/k norms follow the target family (Qwen3/Gemma3 have them, Llama
  does not), like speculators' per-family EAGLE-3 layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from drafter.models import register, speculators_format as fmt
from drafter.models.base import BatchedDraftModel, Proposal, TargetHeads, TrainBatch, TrainOutput
from drafter.models.layers import (DecoderLayer, RMSNorm, Rotary, draft_layer_config, init_weights, pad_rows,
                                   ttt_attention)
from drafter.models.metrics import (
    Generators, acceptance_from_l1, choose_positions, l1_to_target, per_position, sample, soft_cross_entropy, target_dist,
)
from drafter.models.vocab import DraftVocab

QK_NORM_FAMILIES = ("qwen3", "gemma3")


@dataclass
class Eagle3Config:
    layer_ids: list[int]  # target feature layers fused by fc (decoder layer index, -1 = embeddings)
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    block_size: int = 7  # tokens drafted per round by default (the exported proposal length)
    draft_vocab_size: int | None = None  # None or >= target vocabulary: full vocabulary
    max_anchors: int = 512  # chains (unrolls from one start position) trained per sequence
    initializer_range: float = 0.02


@dataclass
class Eagle3State:
    k: torch.Tensor  # [1, kv_heads, L', d]: keys of confirmed positions 1..L-1
    v: torch.Tensor
    last: torch.Tensor | None = None  # fused feature of the last confirmed position [1, H]
    length: int = 0


@register
class Eagle3(DraftVocab, BatchedDraftModel):
    algorithm = "eagle3"
    architecture = "Eagle3Speculator"

    def __init__(self, config: Eagle3Config, heads: TargetHeads) -> None:
        super().__init__(config, heads)
        H, V = heads.hidden_size, heads.vocab_size
        self.layer_config = draft_layer_config(heads.config, 1)
        qk_norm = str(heads.config.model_type).startswith(QK_NORM_FAMILIES)
        self.fc = nn.Linear(len(config.layer_ids) * H, H, bias=False)
        layer = DecoderLayer(self.layer_config, attn_in_dim=2 * H, qk_norm=qk_norm, hidden_norm=True)
        self.layers = nn.ModuleList([layer])
        self.norm = RMSNorm(H, self.layer_config.rms_norm_eps)
        self.rotary = Rotary(self.layer_config)
        self.init_draft_vocab(config.draft_vocab_size, V)
        init_weights(self, config.initializer_range)
        self.verifier = fmt.verifier_of(heads.config)
        self.meta: dict[str, Any] = {}

    @classmethod
    def config_from(cls, cfg: Any, layer_ids: list[int]) -> Eagle3Config:
        d = cfg.drafter
        return Eagle3Config(
            layer_ids=list(layer_ids), ttt_steps=d.ttt_steps, ttt_decay=d.ttt_decay,
            block_size=d.block_size, draft_vocab_size=d.draft_vocab_size, max_anchors=cfg.train.max_anchors,
        )

    @property
    def gamma(self) -> int:
        return self.config.ttt_steps

    # ----- the layer ---------------------------------------------------------------------------
    def _inputs(self, tok_emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.layers[0]
        return torch.cat([layer.input_layernorm(tok_emb), layer.hidden_norm(hidden)], -1)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.heads.embed_tokens(ids).to(self.fc.weight.dtype)

    def ttt_hidden(self, batch: TrainBatch, chains: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The unrolled training forward: per step i, final-normed hidden whose index t
        predicts the token at position t+2+i (index t <-> position s = t+1).

        `chains` None: every index, [b, T-1, H] per step. `chains` [b, A] (indices): only
        those chains, [b, A, H] per step. A chain depends on the step-0 keys of every index
        and on its own earlier steps only, so the result is the same rows, and the unroll's
        layer work shrinks from T-1 to A rows a sequence after the step-0 keys.
        """
        ids = batch.input_ids
        b, T = ids.shape
        N = T - 1
        device = ids.device
        attn, layer = self.layers[0].self_attn, self.layers[0]
        hidden = self.fc(batch.features.flatten(-2))[:, :-1]  # h_{s-1} at index s-1
        idx = torch.arange(N, device=device)
        causal = idx[None, :] <= idx[:, None]  # [query, key]
        mask = (causal[None] & batch.attention_mask[:, 1:][:, None, :]) | torch.eye(N, dtype=torch.bool, device=device)
        # step 0: keys and values of every index (what all chains attend to)
        cos, sin = self.rotary((idx + 1).expand(b, N), hidden.dtype)
        x2 = self._inputs(self._embed(ids[:, 1:]), hidden)
        k0, v0 = attn.kv(x2, cos, sin)
        rows = idx.expand(b, N) if chains is None else chains  # [b, R] query indices
        pick = lambda x: x.gather(1, rows.reshape(b, -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))  # noqa: E731
        mask = mask.gather(1, rows[..., None].expand(-1, -1, N))
        hidden = pick(hidden)
        diag_k: list[torch.Tensor] = []
        diag_v: list[torch.Tensor] = []
        outs = []
        for i in range(self.config.ttt_steps):
            cos, sin = self.rotary(rows + 1 + i, hidden.dtype)
            if i == 0:
                x = pick(x2)
            else:  # teacher forcing: x_{s+i} (0 past the end: such rows are masked from the loss)
                tok = F.pad(ids, (0, i + 1), value=0).gather(1, rows + 1 + i)
                x = self._inputs(self._embed(tok), hidden)
                k, v = attn.kv(x, cos, sin)
                diag_k.append(k)
                diag_v.append(v)
            out = ttt_attention(attn.q(x, cos, sin), k0, v0, mask, diag_k, diag_v, attn.scale)
            hidden = layer.feed_forward(hidden + attn.out(out))  # the draft's own state replaces h
            outs.append(self.norm(hidden))
        return outs

    # ----- training ------------------------------------------------------------------------------
    def forward(self, batch: TrainBatch, **kwargs: Any) -> TrainOutput:
        return self.forward_train(batch, **kwargs)  # so DDP wrappers see a forward()

    def forward_train(self, batch: TrainBatch, *, generator: Generators = None, reduction: str = "mean") -> TrainOutput:
        """Soft cross-entropy over the unrolled steps of up to `max_anchors` chains a sequence,
        like DFlash/DSpark's anchors: the same number of drafted positions per step for the
        three. Step 0's keys cover every position (all chains attend to them); the unroll
        itself runs on the chains only."""
        steps = self.config.ttt_steps
        ok = batch.loss_mask & batch.attention_mask
        # index t at step i predicts position t+2+i: a chain starts where t+2 is an assistant token
        first = F.pad(ok[:, 2:], (0, 1), value=False)
        picked = choose_positions(first, self.config.max_anchors, generator)
        A = max(1, max(c.numel() for c in picked))
        chains = torch.zeros(len(picked), A, dtype=torch.long, device=ok.device)
        run = torch.zeros(len(picked), A, dtype=torch.bool, device=ok.device)
        for row, c in enumerate(picked):
            chains[row, : c.numel()], run[row, : c.numel()] = c.to(ok.device), True
        outs = self.ttt_hidden(batch, chains)
        valid = []
        padded_ok = F.pad(ok, (0, steps + 2), value=False)
        for i in range(steps):  # valid while the chain stays in assistant tokens
            run = run & padded_ok.gather(1, chains + 2 + i)
            valid.append(run.nonzero(as_tuple=True))
        # p_t at position t+1+i for every step at once (cached top-k, or once per position via the LM head)
        targets = target_dist(self.heads, batch, torch.cat([bi for bi, _ in valid]),
                              torch.cat([chains[bi, ai] + 1 + i for i, (bi, ai) in enumerate(valid)]))
        total = torch.zeros((), device=ok.device)
        slots, accepts, corrects = [], [], []
        start = 0
        for i, (normed, (bi, ai)) in enumerate(zip(outs, valid)):
            target = targets[start : start + bi.numel()]
            start += bi.numel()
            if self.t2d is not None:  # mask targets the draft vocabulary cannot express
                keep = self.t2d[target.argmax()]
                bi, ai, target = bi[keep], ai[keep], target[keep]
            logp = torch.log_softmax(self.vocab_logits(normed[bi, ai]).float(), -1)
            total = total + self.config.ttt_decay**i * soft_cross_entropy(self, logp, target).sum()
            with torch.no_grad():
                accepts.append(acceptance_from_l1(l1_to_target(self, logp.exp(), target)))
                corrects.append(self.to_target_ids(logp.argmax(-1)) == target.argmax())
                slots.append(torch.full_like(bi, i))
        slot = torch.cat(slots)
        count = slot.numel()
        loss = total if reduction == "sum" else total / max(count, 1)
        metrics = per_position(slot, steps, torch.cat(accepts), torch.cat(corrects))
        return TrainOutput(loss=loss, losses={"soft_ce": loss.detach()}, metrics=metrics)

    # ----- inference ---------------------------------------------------------------------------
    def init_state(self) -> Eagle3State:
        lay, p = self.layer_config, self.fc.weight
        empty = p.new_zeros(1, lay.num_key_value_heads, 0, lay.head_dim)
        return Eagle3State(k=empty, v=empty.clone())

    @torch.no_grad()
    def extend_batch(self, states: Sequence[Eagle3State], features: Sequence[torch.Tensor],
                     input_ids: Sequence[torch.Tensor]) -> None:
        """Every row's new positions as one sequence: the fused features, and each key from its
        token and the feature before it, are per position (each at its row's own position)."""
        attn = self.layers[0].self_attn
        counts = [f.shape[1] for f in features]
        fused = self.fc(torch.cat(list(features), 1).to(self.fc.weight).flatten(-2))[0]  # [N, H], its dtype and device
        rows = fused.split(counts)
        hidden, tokens, positions = [], [], []
        for state, row, ids in zip(states, rows, input_ids):
            at = torch.arange(state.length, state.length + row.shape[0], device=fused.device)
            if state.last is None:  # position 0 has no previous feature: it gets no key
                h, ids, at = row[:-1], ids[:, 1:], at[1:]
            else:
                h = torch.cat([state.last, row[:-1]])
            hidden.append(h)
            tokens.append(ids[0])
            positions.append(at)
        keys = [t.numel() for t in tokens]
        if sum(keys):
            cos, sin = self.rotary(torch.cat(positions)[None], fused.dtype)
            inputs = self._inputs(self._embed(torch.cat(tokens)[None].to(fused.device)), torch.cat(hidden)[None])
            k, v = attn.kv(inputs, cos, sin)
            for state, k_new, v_new in zip(states, k.split(keys, 2), v.split(keys, 2)):
                state.k, state.v = torch.cat([state.k, k_new], 2), torch.cat([state.v, v_new], 2)
        for state, row in zip(states, rows):
            state.last = row[-1:].clone()  # [1, H], not a view that keeps the batch alive
            state.length += row.shape[0]

    @torch.no_grad()
    def propose_batch(
        self,
        states: Sequence[Eagle3State],
        anchors: torch.Tensor,
        gammas: Sequence[int],
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> list[Proposal]:
        """Chain drafting for every row at once: the confirmed keys padded to the longest row's
        (`pad_rows`, the padding masked), each step's token, key and value for all rows together."""
        if any(s.last is None for s in states):
            raise ValueError("EAGLE-3 drafts after at least one confirmed position (call extend first)")
        if any(g < 1 for g in gammas):
            raise ValueError(f"gamma must be >= 1, got {list(gammas)}")
        layer = self.layers[0]
        attn = layer.self_attn
        (k, valid), (v, _) = pad_rows([s.k for s in states]), pad_rows([s.v for s in states])  # new tensors grow
        hidden = torch.cat([s.last for s in states])[:, None]  # [b, 1, H]
        token = anchors.reshape(len(states)).to(hidden.device)
        lengths = torch.tensor([s.length for s in states], device=hidden.device)
        tokens, probs = [], []
        for i in range(max(gammas)):
            cos, sin = self.rotary((lengths + i)[:, None], hidden.dtype)
            x2 = self._inputs(self._embed(token[:, None]), hidden)
            k_new, v_new = attn.kv(x2, cos, sin)
            k, v = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
            valid = None if valid is None else F.pad(valid, (0, 1), value=True)
            out = ttt_attention(attn.q(x2, cos, sin), k, v, None if valid is None else valid[:, None], [], [], attn.scale)
            hidden = layer.feed_forward(hidden + attn.out(out))
            draft, p = sample(self.vocab_logits(self.norm(hidden))[:, 0], temperature, generator)
            token = self.to_target_ids(draft)
            tokens.append(token)
            probs.append(p)
        tokens = torch.stack(tokens, 1)
        return [Proposal(tokens=tokens[r : r + 1, :g], confidences=None,
                         probs=None if probs[0] is None else self.proposal_probs([p[r : r + 1] for p in probs[:g]], temperature))
                for r, g in enumerate(gammas)]

    # ----- persistence ---------------------------------------------------------------------------
    def export(self, out_dir: Path) -> Path:
        cfg = self.config
        fields = {
            "draft_vocab_size": self.draft_vocab_size,
            "norm_before_residual": False,
            "target_hidden_size": None,
            "eagle_aux_hidden_state_layer_ids": fmt.to_speculators_layer_ids(cfg.layer_ids),
            "norm_before_fc": False,
            "fc_norm": False,
            "norm_output": False,
            "embed_requires_grad": False,
        }
        # Unlike DFlash/DSpark, speculators' EAGLE-3 loader (0.9.0) does not refill the
        # verifier's embedding and LM head when a checkpoint lacks them (they stay
        # uninitialised; bench/check_speculators.py shows it), and its own EAGLE-3
        # checkpoints carry both: so ship copies. `load` ignores them (frozen, the target's).
        state = dict(self.state_dict())
        state["embed_tokens.weight"] = self.heads.embed_tokens.weight.detach().clone()  # may be tied to the head
        head = self.heads.lm_head.weight
        state["lm_head.weight"] = head if self.d2t is None else head[self.draft_ids]
        config = fmt.config_json(
            model_type=self.algorithm,
            architecture=self.architecture,
            layer_config=self.layer_config,
            verifier=self.verifier,
            speculative_tokens=cfg.block_size,
            fields=fields,
            drafter={"algorithm": self.algorithm, "config": asdict(cfg), **self.meta},
        )
        return fmt.write(Path(out_dir), config, state)

    @classmethod
    def load(cls, path: Path, heads: TargetHeads) -> Eagle3:
        config, state = fmt.read(Path(path))
        if config["speculators_model_type"] != cls.algorithm:
            raise fmt.DrafterFormatError(f"{path}: a {config['speculators_model_type']} checkpoint, not eagle3")
        fmt.check_target(config, heads, Path(path))
        saved = config.get("drafter", {}).get("config")
        if saved:
            model_cfg = Eagle3Config(**saved)
        else:
            model_cfg = Eagle3Config(
                layer_ids=fmt.from_speculators_layer_ids(config["eagle_aux_hidden_state_layer_ids"]),
                block_size=config["speculators_config"]["proposal_methods"][0]["speculative_tokens"],
                draft_vocab_size=config.get("draft_vocab_size"),
            )
        model = cls(model_cfg, heads)
        for key in (*fmt.FROZEN_KEYS, "lm_head.weight"):  # lm_head: the frozen target head restricted by d2t
            state.pop(key, None)
        model.load_state_dict(state)
        model.verifier = config["speculators_config"]["verifier"]
        model.meta = {k: v for k, v in config.get("drafter", {}).items() if k not in ("algorithm", "config")}
        return model.eval()
