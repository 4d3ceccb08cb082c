"""Lossless speculative decoding: chain drafting, batched verification, per-round statistics.

One engine serves every use: `drafter generate`, evaluation, calibration labels, the
scheduler benchmark, and plain autoregressive decoding (no drafter: one target token a
round), so speedups compare like with like.

A round, per request: the drafter proposes `d_1..d_g` after the anchor (the last emitted
token, whose target features are not known yet); the scheduler may cut that to a prefix
of length l; the target runs once over `[anchor, d_1..d_l]`; drafts are accepted with
`U < p_t/p_d` until the first rejection, whose token is resampled from
`normalize(max(0, p_t - p_d))`; if all l were accepted the target adds a bonus token.
At temperature 0 this is exact greedy matching. The drafter's state is then extended with
the target features of the anchor and the accepted drafts (ALGORITHMS.md section 1).

Batching: R requests share one target KV cache, left-padded. Each round every request
sends its block; when the blocks differ in length they are packed (drafter/attention.py:
one sequence of their real tokens, each row attending to its own cache), otherwise, or when
the scheduler verifies padded (`scheduler.packed=false`), each is padded on the right to the
longest. Prompts of different lengths are always prefilled packed. Either way the cache gets one
block per row, as wide as the longest; afterwards each row keeps its anchor and accepted
drafts: the row shifts right past its rejected slots, and the slots it vacates on the left
become padding. So the cache is always "padding, then the request's confirmed tokens", which is exact for
sliding-window attention too. With one request this is a plain crop. The drafter is asked for
every row's block in one call (`DraftModel.propose_batch`: EAGLE-3, DFlash and DSpark draft them in
one pass), and extends every row's context in another (`extend_batch`).

Every generation carries `breakdown`: its batch's round time by phase (PHASES), read by the
evaluation report and `bench/engine_speedup.py`.
"""

from __future__ import annotations

import itertools
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from transformers.cache_utils import DynamicLayer

from drafter import fused
from drafter.attention import (PackedCache, Packing, RoomyLayer, packed_forward, shift_rows, supports_packing,
                               verify_mask)
from drafter.errors import DrafterError
from drafter.models.base import DraftModel
from drafter.models.metrics import GREEDY_BELOW
from drafter.sampling import Sampler


class DecodingError(DrafterError, RuntimeError):
    """The engine was asked something it cannot do (bad prompt, drafter broke its contract)."""


@dataclass
class Round:
    """What one draft + verify round did for one request."""

    proposed: int  # tokens the drafter drafted
    verified: int  # drafts sent to the target (after scheduling)
    accepted: int  # drafts accepted (the first rejection ends the chain)
    emitted: int  # tokens added to the output: accepted + correction/bonus (none after an accepted EOS)
    confidences: list[float] | None = None  # raw c_k of the drafted tokens, when the drafter has a head


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS included when hit
    rounds: list[Round] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" | "length" | "context"
    seconds: float = 0.0  # wall clock from the start of the batch to this request's end
    prefill_seconds: float = 0.0
    # Seconds of the batch's rounds by phase (PHASES), shared by the requests decoded together.
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def tau(self) -> float:
        """Tokens emitted per round (the prefill's first token is not a round)."""
        return sum(r.emitted for r in self.rounds) / max(len(self.rounds), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": len(self.prompt),
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds,
            "breakdown": self.breakdown,
            "rounds": [[r.proposed, r.verified, r.accepted, r.emitted] for r in self.rounds],
            "confidences": [r.confidences for r in self.rounds] if any(r.confidences for r in self.rounds) else None,
        }


class LengthPolicy(Protocol):
    """Chooses how many drafted tokens of each request the target verifies this round.

    `overhead_s` is the engine's running estimate of a round's time outside the target
    forward (drafting, sampling, cache bookkeeping) at this batch size.
    """

    def lengths(
        self, proposed: Sequence[int], confidences: Sequence[torch.Tensor | None], overhead_s: float = 0.0
    ) -> list[int]: ...


# ----- the acceptance rule ----------------------------------------------------------------
def residual(p_t: torch.Tensor, p_d: torch.Tensor) -> torch.Tensor:
    """Where a rejected position resamples from: normalize(max(0, p_t - p_d)), else p_t."""
    diff = (p_t - p_d).clamp_min(0)
    total = diff.sum()
    return diff / total if total > 0 else p_t


def accept_sampled(
    p_t: torch.Tensor, p_d: torch.Tensor, draft: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """Rejection sampling over one chain: p_t [l+1, V], p_d [l, V], draft [l].

    Returns (number of accepted drafts, the next token: residual sample or bonus).
    """
    n_draft = draft.numel()
    n = 0
    if n_draft:
        pt_tok = p_t[:n_draft].gather(1, draft[:, None]).squeeze(1)
        pd_tok = p_d.gather(1, draft[:, None]).squeeze(1)
        u = torch.rand(n_draft, generator=generator, device=p_t.device)
        ok = u * pd_tok < pt_tok  # U < p_t/p_d without dividing by a zero p_d
        n = int(ok.long().cumprod(0).sum())
    dist = residual(p_t[n], p_d[n]) if n < n_draft else p_t[n]
    return n, int(torch.multinomial(dist, 1, generator=generator))


def accept_greedy(top: Sequence[int], draft: Sequence[int]) -> tuple[int, int]:
    """Temperature 0: accept while the draft equals the target's argmax `top`; then its argmax."""
    n = 0
    while n < len(draft) and draft[n] == top[n]:
        n += 1
    return n, top[n]


# ----- the engine ---------------------------------------------------------------------
# Where a round's time goes: the drafter's proposals, the target's verification forward (LM
# head included), acceptance and emission, the drafter's state update with the target's
# features, KV-cache bookkeeping, and the rest (scheduling, building the block, Python).
PHASES = ("draft", "verify", "accept", "extend", "kv", "other")


class _Phases:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, name: str):
        start = self.clock()
        try:
            yield
        finally:
            self.seconds[name] += self.clock() - start


@dataclass
class _Request:
    index: int
    gen: Generation
    state: Any = None
    anchor: int = 0
    position: int = 0  # position of the anchor in the sequence
    done: bool = False
    keep: int = 0  # slots of this round's block the cache keeps: anchor + accepted drafts
    t_end: float = 0.0


class SpecEngine:
    """Speculative decoding of a target with a drafter (or plain decoding without one).

    `gamma` is the number of tokens drafted per round; `scheduler` (see
    `drafter.scheduler`) decides how many of them the target verifies; `packed` verifies
    blocks of different lengths packed rather than padded to the longest (None: as the
    scheduler's rule assumes, `Scheduler.packed`; packed without one). `temperature`,
    `top_k` and `top_p` (0 and 1: off) are the target's distribution (`drafter.sampling.Sampler`):
    plain decoding draws from it and drafts are accepted against it, so the output follows it.
    """

    def __init__(
        self,
        target,
        drafter: DraftModel | None = None,
        *,
        gamma: int = 7,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        scheduler: LengthPolicy | None = None,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        packed: bool | None = None,
    ) -> None:
        if temperature < 0:
            raise DecodingError(f"temperature must be >= 0, got {temperature}")
        if drafter is not None and gamma < 1:
            raise DecodingError(f"gamma must be >= 1 with a drafter, got {gamma}")
        self.target = target
        self.drafter = drafter
        self.gamma = gamma if drafter is not None else 0
        self.temperature = float(temperature)
        # The target's distribution: what plain decoding samples and what drafts are accepted against.
        self.sampler = None if self.greedy else Sampler(self.temperature, top_k, top_p)
        self.scheduler = scheduler
        rule = getattr(scheduler, "packed", None)  # what the scheduler's cost model assumes
        if packed is not None and rule is not None and packed != rule:
            raise DecodingError(f"the scheduler prices {'packed' if rule else 'padded'} verification; "
                                f"the engine was asked for {'packed' if packed else 'padded'}")
        self.pack_prompts = supports_packing(target)  # prompts of different lengths: prefilled packed
        self.packed = self.pack_prompts and (packed if packed is not None else rule if rule is not None else True)
        self.clock = clock  # wall clock by default; time.process_time on a shared machine (one torch thread)
        self.overhead_s: dict[int, float] = {}  # per batch size: moving average of a round's time outside the forward
        self._phases = _Phases(clock)
        self.eos = set(target.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.device = target.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.max_positions = getattr(target.config, "max_position_embeddings", None) or 1 << 30
        pad = getattr(target.config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW  # where the drafters draft the argmax too

    def generate(
        self, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, on_tokens: Callable[[int, list[int]], None] | None = None
    ) -> Generation:
        return self.generate_batch([prompt], max_new_tokens, on_tokens)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor],
        max_new_tokens: int,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Generation]:
        """Decode R prompts concurrently; `on_tokens(i, ids)` streams each request's new tokens."""
        if max_new_tokens < 1:
            raise DecodingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        reqs = [_Request(i, Generation(prompt=self._as_list(p))) for i, p in enumerate(prompts)]
        if any(not r.gen.prompt for r in reqs):
            raise DecodingError("empty prompt: the target needs at least one token to condition on")
        start = self.clock()
        cache, mask = self._prefill(reqs, max_new_tokens, on_tokens, start)
        phases = self._phases = _Phases(self.clock)
        cache, mask, rows = self._drop_finished(cache, mask, reqs)  # row i of the cache belongs to rows[i]
        rounds_s = 0.0
        while rows:
            begin, batch, verify_before = self.clock(), len(rows), phases.seconds["verify"]
            width = self._round(rows, cache, mask, max_new_tokens, on_tokens)
            with phases("kv"):
                mask = self._realign(cache, mask, rows, width)
                cache, mask, rows = self._drop_finished(cache, mask, rows)
            took = self.clock() - begin
            rounds_s += took
            overhead = took - (phases.seconds["verify"] - verify_before)  # what the SPS profile leaves out
            previous = self.overhead_s.get(batch)
            self.overhead_s[batch] = overhead if previous is None else 0.8 * previous + 0.2 * overhead
        phases.seconds["other"] = max(0.0, rounds_s - sum(phases.seconds.values()))
        for r in reqs:
            r.gen.seconds = r.t_end - start
            r.gen.breakdown = dict(phases.seconds)
        return [r.gen for r in reqs]

    # ----- steps -----------------------------------------------------------------------
    def _as_list(self, prompt) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] != 1:
                raise DecodingError("a prompt tensor must hold one sequence")
            return [int(t) for t in prompt.reshape(-1)]
        return [int(t) for t in prompt]

    def _draw(self, logits: torch.Tensor) -> list[int]:
        """One target token per row of logits [R, V], all rows at once."""
        if self.greedy:
            return logits.max(-1).indices.tolist()
        return self.sampler.draw(logits, self.generator).view(-1).tolist()

    def _prefill(self, reqs: list[_Request], max_new: int, on_tokens, start: float):
        lengths = [len(r.gen.prompt) for r in reqs]
        width = max(lengths)
        if width >= self.max_positions:
            raise DecodingError(f"prompt of {width} tokens does not fit the target's {self.max_positions} positions")
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - lengths[i] :] = torch.tensor(r.gen.prompt)
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        cache = PackedCache()  # plain layers (no sliding-window trimming): crop and realign stay exact
        if self.pack_prompts and min(lengths) < width:  # the prompts' real tokens only, as one sequence
            packing = Packing.of(lengths, self.device, left_padded=True)
            with packed_forward(self.target, cache, packing):
                feats = self.target.capture(packing.pack(ids)[None], attention_mask=verify_mask(mask, width),
                                            position_ids=packing.pack(positions)[None], past_key_values=cache,
                                            use_cache=True, packing=packing)
            ends = list(itertools.accumulate(lengths))
            logits = self.target.logits_from_hidden(feats.final[0, [e - 1 for e in ends]])
            row_layers = [feats.layers[:, e - n : e] for e, n in zip(ends, lengths)]
        else:
            feats = self.target.capture(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            logits = self.target.logits_from_hidden(feats.final[:, -1])
            row_layers = [feats.layers[i : i + 1, width - n :] for i, n in enumerate(lengths)]
        prefill_end = self.clock()
        tokens = self._draw(logits)
        if self.drafter is not None:
            for r in reqs:
                r.state = self.drafter.init_state()
            self.drafter.extend_batch([r.state for r in reqs], row_layers,
                                      [ids[i : i + 1, width - n :] for i, n in enumerate(lengths)])
        for i, r in enumerate(reqs):
            r.gen.prefill_seconds = prefill_end - start
            r.anchor, r.position = tokens[i], lengths[i]
            self._emit(r, [tokens[i]], max_new, on_tokens)
            if r.done:
                r.t_end = self.clock()
        return cache, mask

    def _round(self, rows: list[_Request], cache, mask: torch.Tensor, max_new: int, on_tokens) -> int:
        """Draft, schedule, verify in one target pass, accept; returns the block width."""
        drafts: list[torch.Tensor] = []
        probs: list[torch.Tensor | None] = []
        confs: list[torch.Tensor | None] = []
        gammas = [max(0, min(self.gamma, max_new - len(r.gen.tokens) - 1, self.max_positions - 1 - r.position))
                  for r in rows]
        drafting = [r for r, g in zip(rows, gammas) if g]
        if drafting:
            with self._phases("draft"):  # every row's block in one call (one pass where the drafter can)
                proposals = self.drafter.propose_batch(
                    [r.state for r in drafting], torch.tensor([r.anchor for r in drafting], device=self.device),
                    [g for g in gammas if g], self.temperature, self.generator)
            if len(proposals) != len(drafting):
                raise DecodingError(f"drafter made {len(proposals)} proposals for {len(drafting)} requests")
            proposals = iter(proposals)
        for r, g in zip(rows, gammas):
            if g == 0:
                drafts.append(torch.empty(0, dtype=torch.long, device=self.device))
                probs.append(None)
                confs.append(None)
                continue
            prop = next(proposals)
            tokens = prop.tokens.reshape(-1).to(self.device)
            if not 1 <= tokens.numel() <= g:
                raise DecodingError(f"drafter proposed {tokens.numel()} tokens when asked for {g}")
            if not self.greedy and (prop.probs is None or prop.probs.shape[-2] != tokens.numel()):
                raise DecodingError("drafter must return the probabilities its tokens were drawn from")
            p_d = None if prop.probs is None else prop.probs.reshape(tokens.numel(), -1).to(self.device).float()
            if not self.greedy and not bool((p_d.gather(1, tokens[:, None]) > 0).all()):
                raise DecodingError("drafter gave zero probability to a token it drafted: its probs are not its sampler's")
            drafts.append(tokens)
            probs.append(p_d)
            confs.append(None if prop.confidences is None else prop.confidences.reshape(-1).float().cpu())
        proposed = [d.numel() for d in drafts]
        if self.scheduler is None:
            lengths = list(proposed)
        else:
            lengths = self.scheduler.lengths(proposed, confs, overhead_s=self.overhead_s.get(len(rows), 0.0),
                                             greedy=self.greedy)
        if len(lengths) != len(rows) or any(not 0 <= n <= p for n, p in zip(lengths, proposed)):
            raise DecodingError(f"scheduler chose lengths {lengths} for drafts of {proposed}")
        width = max(lengths) + 1

        block = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        block_mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        positions = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            block[i, 0] = r.anchor
            block[i, 1 : lengths[i] + 1] = drafts[i][: lengths[i]]
            block_mask[i, : lengths[i] + 1] = 1
            positions[i] = r.position + torch.arange(width, device=self.device)
        key_mask = torch.cat([mask, block_mask], dim=1)
        with self._phases("verify"):  # what the SPS profile measures
            packed = self.packed and min(lengths) < max(lengths)
            if packed:
                packing = Packing.of([n + 1 for n in lengths], self.device)
                with packed_forward(self.target, cache, packing):
                    feats = self.target.capture(
                        packing.pack(block)[None],
                        attention_mask=verify_mask(key_mask, width),
                        position_ids=packing.pack(positions)[None],
                        past_key_values=cache,
                        use_cache=True,
                        packing=packing,
                    )
                logits = self.target.logits_from_hidden(feats.final[0])  # [N, V]
                starts = [0, *itertools.accumulate(n + 1 for n in lengths)]
                row_logits = [logits[s : s + n + 1] for s, n in zip(starts, lengths)]
                row_layers = [feats.layers[:, s : s + n + 1] for s, n in zip(starts, lengths)]
            else:
                feats = self.target.capture(
                    block, attention_mask=key_mask, position_ids=positions, past_key_values=cache, use_cache=True
                )
                logits = self.target.logits_from_hidden(feats.final)  # [R, w, V]
                row_logits = [logits[i, : n + 1] for i, n in enumerate(lengths)]
                row_layers = [feats.layers[i : i + 1, : n + 1] for i, n in enumerate(lengths)]

        if self.greedy:
            with self._phases("accept"):  # every row's argmax in one pass, then plain lists
                top = logits.max(-1).indices.tolist()  # argmax's first-maximum ties; bf16 argmax is 2x slower
                row_top = [top[s : s + n + 1] for s, n in zip(starts, lengths)] if packed else top
        elif self.drafter is None:
            with self._phases("accept"):  # plain decoding: every row's next token in one draw
                drawn = self._draw(logits[:, 0])
        extending = []  # (state, features, ids) of the rows the drafter extends
        for i, r in enumerate(rows):
            n_ver = lengths[i]
            draft = drafts[i][:n_ver]
            with self._phases("accept"):
                if self.greedy:
                    n, nxt = accept_greedy(row_top[i], draft.tolist())
                elif self.drafter is None:
                    n, nxt = 0, drawn[i]
                else:
                    p_t = self.sampler.probs(row_logits[i])
                    p_d = probs[i][:n_ver] if n_ver else p_t[:0]
                    n, nxt = accept_sampled(p_t, p_d, draft, self.generator)
                accepted = draft[:n].tolist()
                before = len(r.gen.tokens)
                self._emit(r, [*accepted, nxt], max_new, on_tokens)
            emitted = len(r.gen.tokens) - before
            c = confs[i]
            r.gen.rounds.append(Round(proposed[i], n_ver, min(n, emitted), emitted, None if c is None else c.tolist()))
            r.keep = n + 1
            if r.done:
                r.t_end = self.clock()
                continue
            if self.drafter is not None:
                extending.append((r.state, row_layers[i][:, : n + 1], block[i : i + 1, : n + 1]))
            r.anchor, r.position = nxt, r.position + n + 1
        if extending:
            with self._phases("extend"):  # every row's confirmed positions in one call
                self.drafter.extend_batch(*(list(x) for x in zip(*extending)))
        return width

    def _emit(self, r: _Request, tokens: list[int], max_new: int, on_tokens) -> None:
        """Append tokens, cut at the first EOS and at the token budget."""
        out = []
        for t in tokens:
            out.append(t)
            if t in self.eos:
                r.done, r.gen.finish_reason = True, "eos"
                break
            if len(r.gen.tokens) + len(out) >= max_new:
                r.done, r.gen.finish_reason = True, "length"
                break
        r.gen.tokens.extend(out)
        if not r.done and len(r.gen.prompt) + len(r.gen.tokens) >= self.max_positions:
            r.done, r.gen.finish_reason = True, "context"
        if on_tokens is not None and out:
            on_tokens(r.index, out)

    # ----- cache bookkeeping ----------------------------------------------------------
    def _realign(self, cache, mask: torch.Tensor, rows: list[_Request], width: int) -> torch.Tensor:
        """Drop rejected slots: crop what every row rejected, shift the rest of each row past its own."""
        keep = torch.tensor([r.keep for r in rows], device=self.device)
        block_mask = (torch.arange(width, device=self.device)[None, :] < keep[:, None]).long()
        mask = torch.cat([mask, block_mask], dim=1)
        junk = width - keep
        common = int(junk.min())
        if common:
            cache.crop(-common)
            mask = mask[:, : mask.shape[1] - common]
            junk = junk - common
        if int(junk.max()):
            # Shift row r right by junk[r] in place (`shift_rows`: one memmove per row and head;
            # a gather over the whole cache cost ~9x more: 148 ms a round at R = 16), of its
            # slots from its first real one (its left padding is masked wherever it is); the
            # slots it vacates keep stale values and become padding.
            length = mask.shape[1]
            lead = self._leading_padding(mask).tolist()
            shifts = [(r, j, lead[r]) for r, j in enumerate(junk.tolist()) if j]
            for r, j, _ in shifts:
                mask[r, j:] = mask[r, : length - j].clone()
                mask[r, :j] = 0
            shift_rows([t for layer in self._layers(cache) for t in (layer.keys, layer.values)], shifts)
        return self._trim(cache, mask)

    def _trim(self, cache, mask: torch.Tensor) -> torch.Tensor:
        """Remove leading columns that are padding in every row."""
        lead = int(self._leading_padding(mask).min())
        if lead:
            for layer in self._layers(cache):
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            mask = mask[:, lead:]
        return mask

    @staticmethod
    def _leading_padding(mask: torch.Tensor) -> torch.Tensor:
        """[rows]: the padding slots before each row's first real one."""
        return (mask.cumsum(1) == 0).sum(1)

    @staticmethod
    def _layers(cache):
        for layer in cache.layers:
            if type(layer) not in (DynamicLayer, RoomyLayer):
                raise DecodingError(f"unsupported KV-cache layer {type(layer).__name__}")
            if layer.is_initialized and layer.keys.numel():
                yield layer

    def _drop_finished(self, cache, mask: torch.Tensor, rows: list[_Request]):
        alive = [i for i, r in enumerate(rows) if not r.done]
        if len(alive) == len(rows):
            return cache, mask, rows
        if not alive:
            return cache, mask, []
        idx = torch.tensor(alive, device=self.device)
        cache.batch_select_indices(idx)
        mask = self._trim(cache, mask[idx])
        return cache, mask, [rows[i] for i in alive]


# ----- summaries ----------------------------------------------------------------------
def round_totals(generations: Sequence[Generation]) -> dict[str, float]:
    """Pooled figures over many requests (DeepSpec's tau: all tokens emitted / all rounds)."""
    rounds = [r for g in generations for r in g.rounds]
    emitted = sum(r.emitted for r in rounds)
    return {
        "rounds": len(rounds),
        "emitted": emitted,
        "proposed": sum(r.proposed for r in rounds),
        "verified": sum(r.verified for r in rounds),
        "accepted": sum(r.accepted for r in rounds),
        "tau": emitted / len(rounds) if rounds else float("nan"),
    }


# ----- loading a trained drafter ----------------------------------------------------------
def resolve_drafter_dir(path) -> Path:
    """A model folder (config.json + weights), or a training output folder holding `best/`."""
    path = Path(path)
    for folder in (path, path / "best"):
        if (folder / "config.json").is_file():
            return folder
    raise DecodingError(f"no drafter at {path}: expected config.json there or in {path / 'best'}")


def load_drafter(path, target) -> tuple[DraftModel, Path]:
    """Load a speculators-format drafter for `target`, in the target's device and dtype; returns
    (model, its folder). Drafting is memory-bound (a handful of rows through each weight): bf16
    weights halve what a proposal reads, and verification keeps decoding lossless either way."""
    from drafter.models import REGISTRY, TargetHeads, model_class
    from drafter.prepack import prepack_like

    folder = resolve_drafter_dir(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise DecodingError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    algorithm = config.get("speculators_model_type")
    if not algorithm:
        raise DecodingError(f"{folder / 'config.json'}: no speculators_model_type")
    try:
        cls = REGISTRY.get(algorithm) or model_class(algorithm)
    except ValueError as exc:
        raise DecodingError(f"{folder / 'config.json'}: {exc}") from None
    model = cls.load(folder, TargetHeads.from_target(target))
    wanted = getattr(model.config, "layer_ids", None)
    if wanted is not None and list(wanted) != list(target.layer_ids):
        raise DecodingError(f"{folder}: the drafter reads the target's feature layers {list(wanted)} but the target "
                            f"captures {list(target.layer_ids)}: set target.layer_ids or target.num_feature_layers "
                            "as for the cache it was trained on")
    model = model.to(target.device, target.dtype).eval()
    prepack_like(model, target.model)  # the drafter is frozen here too (runtime.prepack)
    fused.install(model)
    return model, folder


def block_size_of(drafter: DraftModel | None, default: int) -> int:
    """The drafter's own block size when its config states one, else `default`."""
    config = getattr(drafter, "config", None)
    value = config.get("block_size") if isinstance(config, dict) else getattr(config, "block_size", None)
    return int(value) if isinstance(value, int) and value > 0 else default
