"""The target's attention on this hardware, and packed (ragged) verification.

Short queries in bf16 on a CPU: torch 2.13's scaled_dot_product_attention (its flash kernel
for CPU) is slow for a few query tokens over a long cache, in bf16 only (one thread, 9 query
heads over 3 KV heads and 373 cached tokens: 0.37 ms for one row of one token and 6.1 ms for 16
rows, against 0.11 and 0.55 ms for two matrix products; fp32 is unaffected). Every decoding
step is such a query. `install` makes the target's attention `ATTENTION`, which computes those
as transformers' eager attention does (scores in the weights' dtype, softmax in float32),
grouping each KV head's query heads instead of copying the cache per head, and hands
everything else to transformers' own SDPA function. Where the few-rows build runs on a CPU with
AVX-512 BF16, those short queries take `csrc/short_attention.cpp` instead (`_short_attention`):
the same roundings in one pass over each KV head's cache, each block of 16 keys transposed once
and shared by every query (16 scores a `vdpbf16ps` chain), and torch's own vectorised exp (one
layer of SmolLM2, one thread, 260 cached tokens: 3.7-5.8x the matrix products for 1-8 query tokens
of one row, 1.7-2.2x for 8-16 rows of one token; `bench/short_attention.py`).

Packed verification (and prefill): a padded batch runs every row at the widest row's block width, so the
projections, MLPs and the LM head pay for padding. Packed, the R blocks are flattened into one sequence of N real
tokens (`[1, N]`, each with its own position id) and only attention sees the rows: each
layer's new keys/values are scattered into the usual per-row `[R, heads, width, d]` block of
the KV cache (`PackedCache.update`), and the queries are scattered the same way so that each
row attends to its own cache under a block-causal mask (`packed_attention`). What the cache
holds afterwards is exactly what a padded forward leaves (the gaps hold zeros instead of pad
tokens' keys, masked either way), so the engine's cache bookkeeping is unchanged.

Both run through transformers' attention interface (`AttentionInterface.register`); the
packing reaches the attention function as a keyword argument of the model's forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from drafter import few_rows

ATTENTION = "drafter"
SHORT_QUERY = 16  # query tokens up to which bf16 on a CPU takes the matrix-product path


# ----- attention ------------------------------------------------------------------------------
def _grouped_attention(query, key, value, mask, scaling=None):
    """query [B, h, T, d], key/value [B, kv, S, d], mask bool [B, 1, T, S] (True: attend) or None
    (causal, the queries last); scaling defaults to d^-0.5. Each KV head's h/kv query heads go
    through it as one matrix."""
    batch, heads, length, dim = query.shape
    kv, total = key.shape[1], key.shape[2]
    group = heads // kv
    q = (query * (scaling if scaling is not None else dim**-0.5)).reshape(batch, kv, group * length, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).view(batch, kv, group, length, total)
    if mask is None and length > 1:
        mask = torch.ones(length, total, dtype=torch.bool, device=query.device).tril(total - length)[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs.view(batch, kv, group * length, total), value).view(batch, heads, length, dim)


def _short_attention(query, key, value, mask, scaling=None, tokens=None):
    """`_grouped_attention`'s result, from `csrc/short_attention.cpp` where it runs
    (`kernel_takes`): one pass over each KV head's cached keys and values, 16 keys' scores at a
    time with `vdpbf16ps`, the same roundings (scores and probabilities to bf16, softmax in
    float32 with torch's own exp); sums in another order, so equal to the bit on ~99.8% of
    outputs and within one bf16 step elsewhere. A query's result does not depend on how many
    other tokens or rows are verified with it, so decoding stays lossless.

    `tokens` [B] (or None: all T): row b's real queries are its first tokens[b]; the kernel
    computes only those (a packed verification's rows differ in length), and the other slots'
    outputs are whatever the path leaves there: callers read the real ones only."""
    if not kernel_takes(query, key, value, mask):
        return _grouped_attention(query, key, value, mask, scaling)
    return kernel_attention(query, key, value, mask, scaling, tokens)


def kernel_attention(query, key, value, mask, scaling=None, tokens=None):
    """The short-query kernel on what `kernel_takes` accepts: query [B, h, T, d], key/value
    [B, kv, S, d], mask bool [B or 1, 1, T, >= S] (True: attend) or None (causal, the queries
    last); `tokens` int64 [B] or None (see `_short_attention`)."""
    if mask is not None:
        mask = mask[:, 0, :, : key.shape[2]].expand(query.shape[0], query.shape[2], key.shape[2])
    return torch.ops.drafter_attention.attend(query * (scaling if scaling is not None else query.shape[-1] ** -0.5),
                                              key, value, mask, tokens)


def kernel_takes(query, key, value, mask) -> bool:
    """Whether the short-query kernel takes these: built with the few-rows kernel (an AVX-512 CPU)
    on a CPU with AVX-512 BF16, bf16, a head size that is a multiple of 32 up to 256,
    each KV head's keys and values S x D contiguous, a mask shared by the heads."""
    dim = query.shape[-1]
    return (key.dtype == torch.bfloat16 and dim % 32 == 0 and dim <= 256 and key.stride(-1) == 1
            and key.stride(-2) == dim and value.stride() == key.stride() and (mask is None or mask.shape[1] == 1)
            and few_rows.attention_available())


def _short_query(query) -> bool:
    return query.dtype == torch.bfloat16 and query.device.type == "cpu" and query.shape[2] <= SHORT_QUERY


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, but short bf16 queries on a CPU take `_short_attention`."""
    if not _short_query(query) or dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # an additive float mask: 0 where allowed
    return _short_attention(query, key, value, attention_mask, scaling).transpose(1, 2), None


AttentionInterface.register(ATTENTION, attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # None where SDPA's is_causal would do


def install(model) -> None:
    """Use `attention` in a CPU model that uses transformers' SDPA attention (others keep theirs)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and next(model.parameters()).device.type == "cpu":
        model.set_attn_implementation(ATTENTION)


@contextmanager
def attention_implementation(config, name: str):
    """Within: the models of `config` attend through `name` (their modules read it every forward)."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def sdpa_attention(model):
    """Within: transformers' own SDPA instead of `attention` (for code that accepts no other,
    e.g. continuous batching); other implementations stay."""
    current = model.config._attn_implementation
    return attention_implementation(model.config, "sdpa" if current == ATTENTION else current)


# ----- packed verification --------------------------------------------------------------------
PACKED_ATTENTION = "drafter_packed"


@dataclass(frozen=True)
class Packing:
    """Where each of N packed tokens sits in a [rows, width] block: flat slot row * width + j."""

    index: torch.Tensor  # [N] flat slots, rows in order, each row's tokens contiguous
    rows: int
    width: int
    tokens: torch.Tensor | None = None  # [rows] tokens a row holds, when they are its first slots

    @classmethod
    def of(cls, lengths: Sequence[int], device: torch.device | str = "cpu", left_padded: bool = False) -> Packing:
        """Row r holds lengths[r] tokens: slots 0..lengths[r]-1 of a block as wide as the longest
        (a verification block), or its last lengths[r] slots with `left_padded` (a prompt)."""
        width = max(lengths)
        index = torch.cat([r * width + (width - n if left_padded else 0) + torch.arange(n)
                           for r, n in enumerate(lengths)]).to(device)
        return cls(index, len(lengths), width, None if left_padded else torch.tensor(lengths, dtype=torch.long))

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, heads, N, d] -> [rows, heads, width, d], zeros where a row has no token."""
        _, heads, _, dim = x.shape
        flat = x.new_zeros(self.rows * self.width, heads, dim)
        flat[self.index] = x[0].transpose(0, 1)
        return flat.view(self.rows, self.width, heads, dim).transpose(1, 2)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> [N, ...]: the packed tokens' entries."""
        return x.reshape(self.rows * self.width, *x.shape[2:])[self.index]


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of a buffer with room after them: a step
    writes its block in place instead of concatenating (which copies the whole cache in every
    layer: at 16 rows and 372 cached tokens a third of a one-token forward on a CPU).

    Everything DynamicLayer and the engine do to `keys`/`values` by slicing (crop, dropping
    leading padding, shifting a row in place) keeps them views of the buffer; anything else
    (selecting rows) makes a new tensor, and the next update copies it into a new buffer."""

    ROOM = 128  # free slots after the cached ones when a buffer is (re)allocated

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        span = self._span(new)
        if span is None:  # no buffer, or no room after the cached slots: a new buffer, with room
            length = self.keys.shape[-2] if self.keys.numel() else 0
            shape = (*key_states.shape[:2], length + new + self.ROOM, key_states.shape[-1])
            self._buffers = tuple(torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
                                  for _ in range(2))
            if length:
                for buf, old in zip(self._buffers, (self.keys, self.values)):
                    buf[:, :, :length] = old
            span = (0, length)
        start, end = span
        for buf, states in zip(self._buffers, (key_states, value_states)):
            buf[:, :, end : end + new] = states
        self.keys, self.values = (buf[:, :, start : end + new] for buf in self._buffers)
        return self.keys, self.values

    def _span(self, new: int) -> tuple[int, int] | None:
        """(start, end) of the cached slots in the buffer, when `keys` and `values` are still its
        views and `new` more slots fit after them; else None."""
        if self._buffers is None:
            return None
        spans = []
        for buf, view in zip(self._buffers, (self.keys, self.values)):
            if (view.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() or view.stride() != buf.stride()
                    or view.shape[:2] != buf.shape[:2]):
                return None
            start, rest = divmod(view.storage_offset() - buf.storage_offset(), buf.stride(2))
            if rest or start < 0:
                return None
            spans.append((start, start + view.shape[2]))
        if spans[0] != spans[1] or spans[0][1] + new > self._buffers[0].shape[2]:
            return None
        return spans[0]

    def reset(self) -> None:
        self._buffers = None
        super().reset()


def shift_rows(tensors: Sequence[torch.Tensor], shifts: Sequence[tuple[int, int, int]]) -> None:
    """In every [B, H, S, D] tensor, for each (row r, shift j, first slot f): row r's slots
    [f, S - j) move right by j, in place. On a CPU with the kernels built, one memmove per row and
    head (`csrc/fused_ops.cpp`; at 16 rows after ~400 tokens a third of the copies' time, which
    went through a temporary); elsewhere slice copies."""
    if not shifts:
        return
    if few_rows.available() and all(t.device.type == "cpu" and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]
                                    for t in tensors):
        rows, js, firsts = (list(x) for x in zip(*shifts))
        torch.ops.drafter_fused.shift_slots(list(tensors), rows, js, firsts)
        return
    shift_rows_by_slices(tensors, shifts)


def shift_rows_by_slices(tensors: Sequence[torch.Tensor], shifts: Sequence[tuple[int, int, int]]) -> None:
    """`shift_rows` by slice copies through a temporary (any device or layout)."""
    for t in tensors:
        length = t.shape[2]
        for r, j, first in shifts:
            t[r, :, first + j :] = t[r, :, first : length - j].clone()


class PackedCache(DynamicCache):
    """A DynamicCache of `RoomyLayer`s that, while `packing` is set, takes a packed block's
    keys/values and stores them as the per-row block a padded forward would have stored."""

    packing: Packing | None = None

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = RoomyLayer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.packing is not None:
            key_states, value_states = self.packing.unpack(key_states), self.packing.unpack(value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packing=None, **_):
    """Attention of N packed queries, each against its own row of the cache.

    query [1, heads, N, d]; key/value [rows, kv_heads, L, d] (PackedCache's per-row cache);
    attention_mask [rows, 1, width, L], True where a slot may attend. Returns [1, N, heads, d],
    the layout of transformers' own attention functions."""
    if packing is None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention needs the packing of its batch")
    q = packing.unpack(query)  # [rows, heads, width, d]
    if _short_query(q):  # only each row's own queries: the kernel skips the slots past them
        out = _short_attention(q, key, value, attention_mask, scaling, packing.tokens)
    else:
        out = F.scaled_dot_product_attention(
            q, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=q.shape[1] != key.shape[1]
        )
    return packing.pack(out.transpose(1, 2))[None], None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def verify_mask(key_mask: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, L + width] key mask (1 = a real token, the block last) -> [rows, 1, width, L + width]
    boolean mask: a block slot sees the row's real cached tokens and the block's slots up to itself."""
    total = key_mask.shape[1]
    slots = torch.arange(width, device=key_mask.device)
    keys = torch.arange(total, device=key_mask.device) - (total - width)  # block slot of each key (<0: cached)
    causal = keys[None, :] <= slots[:, None]  # [width, L + width]
    return (key_mask.bool()[:, None, :] & causal[None])[:, None]


def supports_packing(target) -> bool:
    """Packed verification needs plain scaled dot-product attention over the whole context in
    every layer: no logit soft-capping, no sliding window (one mask serves every layer)."""
    config = target.config
    types = getattr(config, "layer_types", None)
    sliding = (any(t != "full_attention" for t in types) if types else
               getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True))
    return (not sliding and getattr(config, "attn_logit_softcapping", None) is None
            and config._attn_implementation in ("sdpa", ATTENTION))


@contextmanager
def packed_forward(target, cache: PackedCache, packing: Packing):
    """Within: the target's attention is `packed_attention` and `cache` stores packed blocks."""
    with attention_implementation(target.config, PACKED_ATTENTION):
        cache.packing = packing
        try:
            yield
        finally:
            cache.packing = None
