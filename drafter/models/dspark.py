"""DSpark: the DFlash block backbone + a sequential Markov head + a confidence head.

ALGORITHMS.md sections 4 and 5. One forward pass of a few decoder layers shaped like
the target turns the block `[anchor, MASK x (S-1)]` into S hidden states; slot k (0-based)
predicts the token at anchor_pos + k + 1 (DeepSpec's layout). Context enters every layer
as extra keys/values: `ctx = RMSNorm(Linear(concat(feature layers)))`, projected by the
layer's own k/v projections. Then

    logits_k = U_k + W2(W1[x_{k-1}])     (x_0 = anchor; `gated`: W1 x scaled by a sigmoid gate)
    c_k      = sigmoid(w^T [h_k ; W1[x_{k-1}]])

trained with teacher forcing (previous tokens = ground truth) and sampled left to right at
inference. DFlash (dflash.py) is this class with r = 0, no confidence head and CE only.

Deviations, and why:
- Position weights follow the public code, exp(-k / loss_decay) with 0-based k
  (loss_decay = 4), and the TV term is the full L1 sum, as in the public code; the paper
  writes exp(-(k-1)/gamma) and TV = half the L1.
- Every loss term is averaged over all valid (block, slot) pairs of the batch, so the
  trainer can sum across micro-batches and processes and divide once (exact DDP and
  gradient-accumulation equivalence).
- The draft layers use Qwen3-style RMSNorm (x * w) and scaling head_dim^-0.5 whatever the
  target family (as DFlash and speculators do); the frozen target embedding (with
  Gemma's scale) and LM head (with Gemma's soft-capping, applied to U before the bias)
  are the target's own.
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
from drafter.models.layers import (DecoderLayer, RMSNorm, Rotary, block_attention, draft_layer_config, init_weights,
                                   pad_rows)
from drafter.models.metrics import (
    Generators, acceptance_from_l1, choose_positions, l1_to_target, per_position, sample, target_dist,
)
from drafter.models.vocab import DraftVocab


@dataclass
class DSparkConfig:
    layer_ids: list[int]  # target feature layers (decoder layer index, -1 = embeddings)
    num_layers: int = 2
    block_size: int = 7  # S: slots per block = tokens drafted per forward pass
    markov_rank: int = 256  # r; 0 disables the Markov head
    markov_head_type: str = "vanilla"  # vanilla | gated
    confidence_head: bool = True
    ce_weight: float = 0.1
    tv_weight: float = 0.9
    bce_weight: float = 1.0
    ce_target: str = "sampled"  # the CE term's token: the regenerated one, or the target's argmax ("greedy")
    loss_decay: float = 4.0  # position weight exp(-k / loss_decay), k 0-based
    max_anchors: int = 512  # blocks sampled per training sequence
    mask_token_id: int | None = None  # None: the target's (TargetHeads.mask_token_id)
    draft_vocab_size: int | None = None  # None or >= target vocabulary: full vocabulary (vocab.py)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.markov_head_type not in ("vanilla", "gated"):
            raise ValueError(f"markov_head_type must be vanilla or gated, got {self.markov_head_type!r}")
        if self.ce_target not in ("sampled", "greedy"):
            raise ValueError(f"ce_target must be sampled or greedy, got {self.ce_target!r}")
        if self.block_size < 1 or self.num_layers < 1 or not self.layer_ids:
            raise ValueError("block_size and num_layers must be >= 1 and layer_ids non-empty")


# ----- anchors and the block attention layout -----------------------------------------
def sample_anchors(
    loss_mask: torch.Tensor, attention_mask: torch.Tensor, max_anchors: int, generator: Generators = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, up to `max_anchors` positions p where p and p+1 are both assistant
    tokens (see `choose_positions`). -> anchors [b, A], valid [b, A]."""
    ok = loss_mask & attention_mask
    chosen = choose_positions(ok[:, :-1] & ok[:, 1:], max_anchors, generator)
    width = max(1, max(c.numel() for c in chosen))
    anchors = torch.zeros(len(chosen), width, dtype=torch.long)
    valid = torch.zeros(len(chosen), width, dtype=torch.bool)
    for i, idx in enumerate(chosen):
        anchors[i, : idx.numel()], valid[i, : idx.numel()] = idx, True
    return anchors.to(loss_mask.device), valid.to(loss_mask.device)


class BlockLayout:
    """Where the blocks sit and what their queries may attend to.

    A block at anchor p sees the context strictly before p (the target's state at p is
    not known at inference), all of its own block (bidirectional) and no other block.
    """

    def __init__(
        self,
        anchors: torch.Tensor,  # [b, A] long
        anchor_valid: torch.Tensor,  # [b, A] bool (False: padding, no block)
        attention_mask: torch.Tensor,  # [b, T] bool
        block_size: int,
    ) -> None:
        self.anchors, self.anchor_valid, self.block_size = anchors, anchor_valid, block_size
        T = attention_mask.shape[1]
        before = torch.arange(T, device=anchors.device) < anchors[..., None]
        self.ctx_visible = before & attention_mask[:, None, :] & anchor_valid[..., None]  # [b, A, T]

    @property
    def positions(self) -> torch.Tensor:
        """[b, A, S]: the sequence positions of each block's slots (anchor_pos + k)."""
        return self.anchors[..., None] + torch.arange(self.block_size, device=self.anchors.device)

    def slot_valid(self, ok: torch.Tensor) -> torch.Tensor:
        """[b, A, S]: slot k counts if tokens p+1 .. p+k+1 are all in bounds and assistant
        tokens (a block's valid positions are its contiguous, loss-masked prefix)."""
        T = ok.shape[1]
        target_pos = self.positions + 1
        inb = target_pos < T
        gathered = torch.gather(ok, 1, target_pos.clamp(max=T - 1).flatten(1)).view_as(target_pos)
        return (gathered & inb).cumprod(-1).bool() & self.anchor_valid[..., None]

    def dense(self) -> torch.Tensor:
        """The mask `block_attention` applies, materialised: [b, A*S, T + A*S] bool,
        queries (block-major) x keys [context | every block's slots]."""
        b, A = self.anchors.shape
        S = self.block_size
        ctx = self.ctx_visible[:, :, None, :].expand(b, A, S, -1).reshape(b, A * S, -1)
        same = torch.eye(A, dtype=torch.bool, device=self.anchors.device)
        blocks = same[:, None, :, None].expand(A, S, A, S).reshape(A * S, A * S)
        return torch.cat([ctx, blocks.expand(b, -1, -1)], dim=-1)


# ----- heads ------------------------------------------------------------------------------
MEMO_BYTES = 64 << 20  # Markov bias rows a drafter keeps at inference (4,096 rows of 8,192 bf16 logits)
MEMO_ROWS = 64  # drafting at most this many requests together reads the kept rows


class MarkovHead(nn.Module):
    """Low-rank first-order bias B_k = W2(W1[x_{k-1}]) over the drafter's vocabulary.

    W1 embeds the previous *target* token (any of V: an anchor may lie outside a reduced
    draft vocabulary); W2 scores the drafter's N tokens (speculators' layout).
    """

    def __init__(self, in_vocab: int, out_vocab: int, rank: int, hidden_size: int, head_type: str) -> None:
        super().__init__()
        self.head_type = head_type
        self.markov_w1 = nn.Embedding(in_vocab, rank)
        self.markov_w2 = nn.Linear(rank, out_vocab, bias=False)
        if head_type == "gated":  # a sigmoid gate over [h_k ; W1 x] scales W1 x
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        self.forget()

    def forget(self) -> None:
        """Drop the bias rows kept for drafting (`_remembered`)."""
        self._memo: dict[int, torch.Tensor] = {}
        self._memo_version: tuple[int, int] | None = None

    def forward(self, prev: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prev [...] ids, hidden [..., H] -> (bias [..., V], W1[prev] [..., r])."""
        emb = self.markov_w1(prev)
        used = emb
        if self.head_type == "gated":
            used = torch.sigmoid(self.gate_proj(torch.cat([hidden, emb.to(hidden.dtype)], -1))) * emb
        elif self._memoizes(prev):
            return self._remembered(prev, emb), emb
        return self.markov_w2(used), emb

    def _memoizes(self, prev: torch.Tensor) -> bool:
        # Drafting on a CPU, a token per request at a time: W2 (r x N, 4 MiB for SmolLM2) is read
        # for bias rows of N values that depend on the previous token alone.
        return prev.dim() <= 1 and prev.numel() <= MEMO_ROWS and prev.device.type == "cpu" and not torch.is_grad_enabled()

    def _remembered(self, prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The bias rows of the tokens `prev`: those not kept yet from one product, then kept while
        W2 is unchanged, up to MEMO_BYTES; a kept row is read back as it was computed."""
        weight = self.markov_w2.weight
        version = (id(weight), weight._version)
        if self._memo_version != version:
            self.forget()
            self._memo_version = version
        tokens, flat = prev.reshape(-1).tolist(), emb.reshape(-1, emb.shape[-1])
        missing = [i for i, t in enumerate(tokens) if t not in self._memo]
        found = {}
        if missing:
            computed = self.markov_w2(flat[missing])
            for j, i in enumerate(missing):
                found[i] = row = computed[j : j + 1]
                if (len(self._memo) + 1) * row.numel() * row.element_size() <= MEMO_BYTES:
                    self._memo.setdefault(tokens[i], row)
        rows = [found[i] if i in found else self._memo[t] for i, t in enumerate(tokens)]
        return (rows[0] if len(rows) == 1 else torch.cat(rows)).view(*emb.shape[:-1], rows[0].shape[-1])


class ConfidenceHead(nn.Module):
    """c_k = sigmoid(w^T [h_k ; W1[x_{k-1}]] + b); returns the logit."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


@dataclass
class BlockState:
    """Confirmed context of one sequence: each layer's context keys/values (RoPE applied)."""

    k: list[torch.Tensor]  # per layer [1, kv_heads, L, d]
    v: list[torch.Tensor]
    length: int = 0


@register
class DSpark(DraftVocab, BatchedDraftModel):
    algorithm = "dspark"
    architecture = "DSparkSpeculator"

    def __init__(self, config: DSparkConfig, heads: TargetHeads) -> None:
        super().__init__(config, heads)
        if config.mask_token_id is None:
            config.mask_token_id = heads.mask_token_id
        if config.mask_token_id is None:
            raise ValueError("DFlash/DSpark need a MASK token id (TargetHeads.mask_token_id is None)")
        if config.mask_token_id in heads.eos_token_ids:
            raise ValueError(f"MASK token id {config.mask_token_id} is an end-of-sequence token of the target")
        self.layer_config = draft_layer_config(heads.config, config.num_layers)
        H = heads.hidden_size
        self.init_draft_vocab(config.draft_vocab_size, heads.vocab_size)
        Vd = self.draft_vocab_size
        self.fc = nn.Linear(len(config.layer_ids) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, self.layer_config.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(self.layer_config) for _ in range(config.num_layers))
        self.norm = RMSNorm(H, self.layer_config.rms_norm_eps)
        self.rotary = Rotary(self.layer_config)
        self.markov_head = (
            MarkovHead(heads.vocab_size, Vd, config.markov_rank, H, config.markov_head_type)
            if config.markov_rank > 0 else None
        )
        self.confidence_head = ConfidenceHead(H + config.markov_rank) if config.confidence_head else None
        init_weights(self, config.initializer_range)
        if self.markov_head is not None:
            nn.init.normal_(self.markov_head.markov_w1.weight, std=0.01)  # as speculators
        self.verifier = fmt.verifier_of(heads.config)
        self.meta: dict[str, Any] = {}

    @classmethod
    def config_from(cls, cfg: Any, layer_ids: list[int]) -> DSparkConfig:
        """The model config from a run `Config` (drafter + train sections)."""
        d = cfg.drafter
        return DSparkConfig(
            layer_ids=list(layer_ids), num_layers=d.num_layers, block_size=d.block_size,
            markov_rank=d.markov_rank, markov_head_type=d.markov_head_type,
            confidence_head=d.confidence_head, ce_weight=d.ce_weight, tv_weight=d.tv_weight,
            bce_weight=d.bce_weight, ce_target=d.ce_target, loss_decay=d.loss_decay, max_anchors=cfg.train.max_anchors,
            mask_token_id=d.mask_token_id, draft_vocab_size=d.draft_vocab_size,
        )

    @property
    def gamma(self) -> int:
        return self.config.block_size

    # ----- the backbone (shared by training and inference) ------------------------
    def context(self, features: torch.Tensor) -> torch.Tensor:
        """features [b, T, n, H] -> ctx [b, T, H] = RMSNorm(Linear(concat))."""
        return self.hidden_norm(self.fc(features.flatten(-2)))

    def context_kv(self, ctx: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's own k/v projections of the context, at `positions` [b, T]."""
        cos, sin = self.rotary(positions, ctx.dtype)
        return [layer.self_attn.kv(ctx, cos, sin) for layer in self.layers]

    def block_hidden(
        self,
        block_ids: torch.Tensor,  # [b, A, S]
        positions: torch.Tensor,  # [b, A, S]
        ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],
        ctx_visible: torch.Tensor | None,  # [b, A, T]; None: one block a row that sees all its context
        ctx_valid: torch.Tensor | None = None,  # [b, T], with ctx_visible None: each row's real slots
    ) -> torch.Tensor:
        """Run the blocks through the layers -> final-normed hidden states [b, A, S, H]."""
        x = self.heads.embed_tokens(block_ids).to(self.fc.weight.dtype)
        cos, sin = self.rotary(positions, x.dtype)
        for layer, (k_ctx, v_ctx) in zip(self.layers, ctx_kv):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            k_blk, v_blk = attn.kv(h, cos, sin)
            out = block_attention(attn.q(h, cos, sin), k_ctx, v_ctx, k_blk, v_blk, ctx_visible, attn.scale, ctx_valid)
            x = layer.feed_forward(x + attn.out(out))
        return self.norm(x)

    def draft_logits(
        self, hidden: torch.Tensor, prev: torch.Tensor, backbone: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """U (target LM head over the draft vocabulary, soft-capped) + Markov bias of the
        previous target token. -> (logits [..., Vd], W1[prev] or None). `backbone`: U when
        already computed (propose runs the LM head once per block)."""
        logits = self.vocab_logits(hidden).float() if backbone is None else backbone
        if self.markov_head is None:
            return logits, None
        bias, emb = self.markov_head(prev, hidden)
        return logits + bias.float(), emb

    def confidence_logit(self, hidden: torch.Tensor, prev_emb: torch.Tensor | None) -> torch.Tensor:
        features = hidden if prev_emb is None else torch.cat([hidden, prev_emb.to(hidden.dtype)], -1)
        return self.confidence_head(features)

    def block_ids(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        """[...] anchor ids -> [..., S] block inputs [anchor, MASK x (S-1)]."""
        ids = torch.full((*anchor_ids.shape, self.config.block_size), self.config.mask_token_id,
                         dtype=torch.long, device=anchor_ids.device)
        ids[..., 0] = anchor_ids
        return ids

    def training_hidden(self, batch: TrainBatch, layout: BlockLayout) -> torch.Tensor:
        """All blocks of a batch in one pass -> [b, A, S, H]."""
        T = batch.input_ids.shape[1]
        positions = torch.arange(T, device=batch.input_ids.device).expand(batch.input_ids.shape[0], T)
        ctx_kv = self.context_kv(self.context(batch.features), positions)
        block_ids = self.block_ids(torch.gather(batch.input_ids, 1, layout.anchors))
        return self.block_hidden(block_ids, layout.positions, ctx_kv, layout.ctx_visible)

    # ----- training ------------------------------------------------------------------------
    def forward(self, batch: TrainBatch, **kwargs: Any) -> TrainOutput:
        return self.forward_train(batch, **kwargs)  # so DDP wrappers see a forward()

    def forward_train(
        self, batch: TrainBatch, *, generator: Generators = None, reduction: str = "mean"
    ) -> TrainOutput:
        """Losses over sampled blocks. `reduction="sum"` leaves the loss un-normalised
        (the trainer divides by the global count, `metrics["count"].sum()` summed)."""
        cfg, S = self.config, self.config.block_size
        anchors, anchor_valid = sample_anchors(batch.loss_mask, batch.attention_mask, cfg.max_anchors, generator)
        layout = BlockLayout(anchors, anchor_valid, batch.attention_mask, S)
        hidden = self.training_hidden(batch, layout)
        ok = batch.loss_mask & batch.attention_mask
        bi, ai, slot = layout.slot_valid(ok).nonzero(as_tuple=True)
        pos = anchors[bi, ai] + slot  # the position whose target state predicts this slot's token
        h = hidden[bi, ai, slot]  # [N, H]
        prev, gold = batch.input_ids[bi, pos], batch.input_ids[bi, pos + 1]  # teacher forcing

        logits, prev_emb = self.draft_logits(h, prev)
        logp = torch.log_softmax(logits.float(), -1)
        p_draft = logp.exp()
        target = target_dist(self.heads, batch, bi, pos)  # cached top-k, or dense via the LM head
        # DFlash trains on CE only: there the distance is a metric, with no graph
        trains_on_l1 = bool(cfg.tv_weight or (self.confidence_head is not None and cfg.bce_weight))
        with torch.set_grad_enabled(trains_on_l1 and torch.is_grad_enabled()):
            l1 = l1_to_target(self, p_draft, target)
        weight = torch.exp(-slot.float() / cfg.loss_decay)

        # A gold token outside the draft vocabulary cannot be drafted: it adds no CE term. Greedy
        # verification accepts the target's argmax, not the token the regeneration sampled.
        if cfg.ce_target == "greedy":
            gold = target.argmax()
        gold_draft = self.draft_index(gold)
        in_vocab = gold_draft < logp.shape[-1]
        gold_logp = F.pad(logp, (0, 1)).gather(-1, gold_draft[:, None])[:, 0]
        terms = {"ce": cfg.ce_weight * -(gold_logp * in_vocab)}
        if cfg.tv_weight:
            terms["tv"] = cfg.tv_weight * l1
        if self.confidence_head is not None and cfg.bce_weight:
            label = acceptance_from_l1(l1.detach())  # analytic acceptance rate c*
            conf = self.confidence_logit(h, prev_emb).float()
            terms["bce"] = cfg.bce_weight * F.binary_cross_entropy_with_logits(conf, label, reduction="none")

        count = slot.numel()
        denom = 1.0 if reduction == "sum" else max(count, 1)
        sums = {name: (weight * t).sum() / denom for name, t in terms.items()}
        loss = sum(sums.values())
        with torch.no_grad():
            correct = self.to_target_ids(logits.argmax(-1)) == target.argmax()
            metrics = per_position(slot, S, acceptance_from_l1(l1.detach()), correct)
        return TrainOutput(loss=loss, losses={k: v.detach() for k, v in sums.items()}, metrics=metrics)

    # ----- inference -----------------------------------------------------------------------
    def init_state(self) -> BlockState:
        p = self.fc.weight
        lay = self.layer_config
        empty = lambda: p.new_zeros(1, lay.num_key_value_heads, 0, lay.head_dim)  # noqa: E731
        return BlockState(k=[empty() for _ in self.layers], v=[empty() for _ in self.layers])

    @torch.no_grad()
    def extend_batch(self, states: Sequence[BlockState], features: Sequence[torch.Tensor],
                     input_ids: Sequence[torch.Tensor]) -> None:
        """Every row's new positions as one sequence: the context projection and each layer's
        keys/values are per position (each at its row's own position), so one pass serves all."""
        device = self.fc.weight.device
        counts = [f.shape[1] for f in features]
        positions = torch.cat([torch.arange(s.length, s.length + t, device=device) for s, t in zip(states, counts)])
        ctx = self.context(torch.cat(list(features), 1).to(self.fc.weight))  # its dtype and device
        for i, (k, v) in enumerate(self.context_kv(ctx, positions[None])):
            for state, k_new, v_new in zip(states, k.split(counts, 2), v.split(counts, 2)):
                state.k[i] = torch.cat([state.k[i], k_new], dim=2)
                state.v[i] = torch.cat([state.v[i], v_new], dim=2)
        for state, t in zip(states, counts):
            state.length += t

    @torch.no_grad()
    def propose_batch(
        self,
        states: Sequence[BlockState],
        anchors: torch.Tensor,
        gammas: Sequence[int],
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> list[Proposal]:
        """Every row's block in one pass: the contexts padded to the longest (`stacked_context`),
        one block forward and one LM-head product for all rows, then the Markov head's sequential
        steps across rows at once. A row's proposal is the one `propose` makes alone, up to the
        rounding of batched products."""
        S = self.config.block_size
        if not all(1 <= g <= S for g in gammas):
            raise ValueError(f"gamma must be in 1..{S} (the block size), got {list(gammas)}")
        device = self.fc.weight.device
        anchors = anchors.reshape(len(states)).to(device)
        lengths = torch.tensor([s.length for s in states], device=device)
        ctx_kv, ctx_valid = self.stacked_context(states)
        positions = (lengths[:, None] + torch.arange(S, device=device))[:, None]  # [b, 1, S]
        width = max(gammas)
        hidden = self.block_hidden(self.block_ids(anchors[:, None]), positions, ctx_kv, None, ctx_valid)[:, 0, :width]
        backbone = self.vocab_logits(hidden).float()  # U for every block: one LM-head product
        if self.markov_head is None:  # DFlash: no sequential dependency, one sampling call
            draft, probs = sample(backbone.flatten(0, 1), temperature, generator)
            tokens = self.to_target_ids(draft).view(len(states), width)
            steps = None if probs is None else list(probs.view(len(states), width, -1).unbind(1))
            confs = None
        else:
            tokens, steps, confs = [], [], []
            prev = anchors
            for k in range(width):  # the Markov head is sequential: x_k feeds slot k+1
                logits, prev_emb = self.draft_logits(hidden[:, k], prev, backbone[:, k])
                draft, p = sample(logits, temperature, generator)
                if self.confidence_head is not None:
                    confs.append(torch.sigmoid(self.confidence_logit(hidden[:, k], prev_emb).float()))
                prev = self.to_target_ids(draft)
                tokens.append(prev)
                steps.append(p)
            tokens, confs = torch.stack(tokens, 1), (torch.stack(confs, 1) if confs else None)
        drawn = None if steps is None or steps[0] is None else steps  # greedy: no distributions
        return [
            Proposal(
                tokens=tokens[r : r + 1, :g],
                probs=None if drawn is None else self.proposal_probs([s[r : r + 1] for s in drawn[:g]], temperature),
                confidences=None if confs is None else confs[r : r + 1, :g],
            )
            for r, g in enumerate(gammas)
        ]

    @staticmethod
    def stacked_context(states: Sequence[BlockState]) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor | None]:
        """Each layer's context keys/values of `states` as one batch (`pad_rows`), and the rows'
        real slots [b, T] (None when no row is padded)."""
        stacked, valid = [], None
        for k, v in zip(zip(*(s.k for s in states)), zip(*(s.v for s in states))):
            (k, valid), (v, _) = pad_rows(k), pad_rows(v)
            stacked.append((k, v))
        return stacked, valid

    # ----- persistence ---------------------------------------------------------------------
    def speculators_fields(self) -> dict[str, Any]:
        cfg = self.config
        fields = {
            "draft_vocab_size": self.draft_vocab_size,
            "block_size": cfg.block_size,
            "target_hidden_size": None,
            "aux_hidden_state_layer_ids": fmt.to_speculators_layer_ids(cfg.layer_ids),
            "mask_token_id": self.config.mask_token_id,
            "sliding_window_non_causal": False,
            # DeepSpec's layout: slot k predicts anchor_pos + k + 1, all S slots are drafts.
            "sample_from_anchor": True,
        }
        if self.algorithm == "dspark":
            fields |= {
                "markov_rank": cfg.markov_rank,
                "markov_head_type": cfg.markov_head_type,
                "enable_confidence_head": cfg.confidence_head,
                "confidence_head_with_markov": cfg.confidence_head and cfg.markov_rank > 0,
            }
        return fields

    def export(self, out_dir: Path) -> Path:
        config = fmt.config_json(
            model_type=self.algorithm,
            architecture=self.architecture,
            layer_config=self.layer_config,
            verifier=self.verifier,
            speculative_tokens=self.config.block_size,
            fields=self.speculators_fields(),
            drafter={"algorithm": self.algorithm, "config": asdict(self.config), **self.meta},
        )
        state = dict(self.state_dict())
        if self.d2t is not None:  # speculators keeps a reduced head serialised: it cannot derive it
            state["lm_head.weight"] = self.heads.lm_head.weight[self.draft_ids]
        return fmt.write(Path(out_dir), config, state)

    @classmethod
    def config_from_speculators(cls, config: dict[str, Any]) -> DSparkConfig:
        saved = config.get("drafter", {}).get("config")
        if saved:
            return DSparkConfig(**saved)
        return DSparkConfig(  # a checkpoint written by another tool
            layer_ids=fmt.from_speculators_layer_ids(config["aux_hidden_state_layer_ids"]),
            num_layers=config["transformer_layer_config"]["num_hidden_layers"],
            block_size=config["block_size"],
            markov_rank=config.get("markov_rank", 0),
            markov_head_type=config.get("markov_head_type", "vanilla"),
            confidence_head=config.get("enable_confidence_head", False),
            mask_token_id=config.get("mask_token_id"),
        )

    @classmethod
    def load(cls, path: Path, heads: TargetHeads) -> DSpark:
        config, state = fmt.read(Path(path))
        if config["speculators_model_type"] != cls.algorithm:
            raise fmt.DrafterFormatError(
                f"{path}: a {config['speculators_model_type']} checkpoint, not {cls.algorithm}"
            )
        fmt.check_target(config, heads, Path(path))
        model = cls(cls.config_from_speculators(config), heads)
        for key in (*fmt.FROZEN_KEYS, "lm_head.weight"):  # the target's own, if a tool saved them
            state.pop(key, None)
        model.load_state_dict(state)
        model.verifier = config["speculators_config"]["verifier"]
        model.meta = {k: v for k, v in config.get("drafter", {}).items() if k not in ("algorithm", "config")}
        return model.eval()
