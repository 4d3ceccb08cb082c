"""The target's attention (drafter/attention.py): short bf16 queries by matrix products, and
packed verification, which must give what a padded forward gives."""

import pytest
import torch
import torch.nn.functional as F

import drafter.attention as att
import drafter.decoding as dec
from drafter import few_rows
from drafter.attention import ATTENTION, PackedCache, Packing, packed_forward, supports_packing, verify_mask
from drafter.decoding import SpecEngine
from tests.drafters import ScriptedDrafter, lively_target, wide_bf16_target
from tests.test_decoding import QUESTIONS, assert_speculative_is_plain, chat, reference


def random_attention(batch, heads, kv, length, total, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, 16, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv, total, 16, generator=g).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("length", [1, 5])
def test_grouped_attention_equals_sdpa(length):
    """GQA grouping, a padding mask, and the causal default without a mask."""
    q, k, v = random_attention(3, 6, 2, length, 20)
    mask = torch.ones(3, 1, length, 20, dtype=torch.bool).tril(20 - length)
    mask[1, ..., :7] = False  # a left-padded row
    causal = torch.ones(length, 20, dtype=torch.bool).tril(20 - length)  # the queries are the last positions
    for given, meant in ((mask, mask), (None, causal)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=meant, enable_gqa=True)
        torch.testing.assert_close(att._grouped_attention(q, k, v, given, 16 ** -0.5), want, rtol=1e-5, atol=1e-5)


def test_short_bf16_queries_take_the_matrix_path_and_the_rest_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(att, "_grouped_attention", lambda *a: calls.append(a[0].shape) or torch.zeros(1, 1, 1, 1))
    monkeypatch.setattr(att, "sdpa_attention_forward", lambda module, q, *a, **k: (calls.append(("sdpa", q.dtype)), None))
    module = torch.nn.Module()
    for dtype, length in ((torch.bfloat16, 1), (torch.bfloat16, att.SHORT_QUERY), (torch.bfloat16, 17), (torch.float32, 1)):
        q, k, v = random_attention(1, 4, 2, length, 30, dtype)
        att.attention(module, q, k, v, None)
    assert calls == [(1, 4, 1, 16), (1, 4, att.SHORT_QUERY, 16), ("sdpa", torch.bfloat16), ("sdpa", torch.float32)]


def test_installed_attention_keeps_a_bf16_target_close_to_sdpa():
    target = lively_target("llama")
    model = target.model.to(torch.bfloat16)
    assert model.config._attn_implementation == ATTENTION  # Target installs it on a CPU model
    ids = torch.tensor([chat(target, QUESTIONS[1])])
    with torch.inference_mode():
        ours = model(ids).logits[0, -1].float()  # the prompt: SDPA; then one decoding step: ours
        step = model(ids[:, :-1], use_cache=True)
        ours_step = model(ids[:, -1:], past_key_values=step.past_key_values).logits[0, -1].float()
        model.set_attn_implementation("sdpa")
        theirs_step = model(ids[:, -1:], past_key_values=model(ids[:, :-1], use_cache=True).past_key_values).logits[0, -1].float()
    torch.testing.assert_close(ours_step, theirs_step, rtol=0, atol=0.05 * float(theirs_step.abs().max()))
    torch.testing.assert_close(ours_step, ours, rtol=0, atol=0.05 * float(ours.abs().max()))


@pytest.mark.parametrize("shape", ["llama", "qwen3"])
def test_packed_forward_gives_what_a_padded_forward_gives(shape):
    """Ragged rows after a left-padded prefill: the same logits, feature layers and cache."""
    target = lively_target(shape)
    assert supports_packing(target)
    g = torch.Generator().manual_seed(0)
    rows, context, lengths = 4, 12, [3, 6, 1, 4]
    width = max(lengths)
    ids = torch.randint(target.vocab_size, (rows, context), generator=g)
    mask = torch.ones(rows, context, dtype=torch.long)
    mask[1, :5] = mask[3, :9] = 0
    block = torch.randint(target.vocab_size, (rows, width), generator=g)
    block_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    key_mask = torch.cat([mask, block_mask], 1)
    positions = mask.sum(1, keepdim=True) + torch.arange(width)[None]
    caches = []
    with torch.inference_mode():
        for _ in range(2):
            caches.append(PackedCache())
            target.capture(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                           past_key_values=caches[-1], use_cache=True)
        padded = target.capture(block, attention_mask=key_mask, position_ids=positions, past_key_values=caches[0], use_cache=True)
        packing = Packing.of(lengths)
        with packed_forward(target, caches[1], packing):
            packed = target.capture(packing.pack(block)[None], attention_mask=verify_mask(key_mask, width),
                                    position_ids=packing.pack(positions)[None], past_key_values=caches[1], use_cache=True,
                                    packing=packing)
    assert target.config._attn_implementation == ATTENTION and caches[1].packing is None  # restored
    assert packed.final.shape[:2] == (1, sum(lengths))
    assert_same_as_padded(packed, padded, packing, caches, key_mask)


def assert_same_as_padded(packed, padded, packing, caches, key_mask):
    """The packed forward's outputs are the padded one's at the packed tokens, and its cache
    (caches[1]) the padded one's (caches[0]) wherever `key_mask` marks a real token."""
    torch.testing.assert_close(packed.final[0], packing.pack(padded.final), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.layers[0], packing.pack(padded.layers), rtol=1e-5, atol=1e-5)
    real = key_mask.bool()[:, None, :, None]
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys * real, b.keys * real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values * real, b.values * real, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ["llama", "qwen3"])
def test_packed_prefill_gives_what_a_left_padded_prefill_gives(shape):
    """Prompts of different lengths as one sequence of their real tokens: the same last logits,
    feature layers and cache (at the real positions) as the left-padded batch."""
    target = lively_target(shape)
    g = torch.Generator().manual_seed(1)
    lengths = [7, 3, 12, 1]
    rows, width = len(lengths), max(lengths)
    ids = torch.randint(target.vocab_size, (rows, width), generator=g)
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    packing = Packing.of(lengths, left_padded=True)
    assert packing.pack(mask[:, :, None])[:, 0].tolist() == [1] * sum(lengths)  # exactly the real tokens
    caches = [PackedCache(), PackedCache()]
    with torch.inference_mode():
        padded = target.capture(ids, attention_mask=mask, position_ids=positions, past_key_values=caches[0], use_cache=True)
        with packed_forward(target, caches[1], packing):
            packed = target.capture(packing.pack(ids)[None], attention_mask=verify_mask(mask, width),
                                    position_ids=packing.pack(positions)[None], past_key_values=caches[1], use_cache=True,
                                    packing=packing)
    assert_same_as_padded(packed, padded, packing, caches, mask)


def test_engine_prefills_prompts_of_different_lengths_packed(monkeypatch):
    """The engine's prefill packs prompts of different lengths (only their real tokens reach the
    model) and the greedy answers are still the target's, one prompt at a time."""
    target = lively_target("llama")
    prompts = [chat(target, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1
    refs = [reference(target, p, 12) for p in prompts]
    packs = []
    monkeypatch.setattr(dec, "packed_forward", lambda t, c, p: packs.append(p.index.numel()) or packed_forward(t, c, p))
    out = SpecEngine(target).generate_batch(prompts, 12)
    assert [g.tokens for g in out] == refs
    assert packs == [sum(len(p) for p in prompts)]  # the prefill, packed; plain decoding's 1-token rounds are not


def test_sliding_window_targets_are_verified_padded():
    assert not supports_packing(lively_target("gemma3"))


class Ragged:
    """A length policy that cuts each request's draft differently every round."""

    def __init__(self):
        self.round = 0

    def lengths(self, proposed, confidences, overhead_s=0.0, greedy=False):
        self.round += 1
        return [min(p, (self.round + i) % (p + 1)) for i, p in enumerate(proposed)]


def test_engine_packs_ragged_blocks_and_decodes_the_target_greedy_answer(monkeypatch):
    target = lively_target("llama")
    prompts = [chat(target, q) for q in QUESTIONS]
    refs = [reference(target, p, 30) for p in prompts]
    packs = []
    # verification blocks only (at most gamma + 1 wide): the prompts are prefilled packed either way
    monkeypatch.setattr(dec, "packed_forward",
                        lambda t, c, p: (p.width <= 6 and packs.append(p.index.numel())) or packed_forward(t, c, p))
    runs = {}
    for packed in (True, False):
        torch.manual_seed(0)
        drafter = ScriptedDrafter({tuple(p): r for p, r in zip(prompts, refs)}, target.vocab_size, error=(1.0, 2.0))
        runs[packed] = SpecEngine(target, drafter, gamma=5, scheduler=Ragged(), packed=packed).generate_batch(prompts, 30)
        assert [g.tokens for g in runs[packed]] == refs
    assert [g.rounds for g in runs[True]] == [g.rounds for g in runs[False]]  # the same decisions, round by round
    padded_tokens = sum(len(g.rounds) for g in runs[True]) * 6
    assert packs and sum(packs) < padded_tokens  # packing ran, on fewer tokens than padding would


def test_verification_packs_as_the_scheduler_prices_it_and_prompts_always_pack(monkeypatch):
    """`scheduler.packed=false` reaches the engine through its scheduler (evaluate and generate
    build the engine from the scheduler alone): ragged blocks are padded, the prompts of
    different lengths are still prefilled packed, and an engine told otherwise is refused."""
    from drafter.decoding import DecodingError
    from drafter.scheduler import Scheduler

    target = lively_target("llama")
    prompts = [chat(target, q) for q in QUESTIONS]
    refs = [reference(target, p, 20) for p in prompts]
    forms = {}
    for packed in (True, False):
        class RaggedRule(Ragged, Scheduler):  # Ragged's cuts, priced as packed or padded
            pass

        rule = RaggedRule()
        rule.packed = packed
        packs = []
        monkeypatch.setattr(dec, "packed_forward", lambda t, c, p, packs=packs: packs.append(p) or packed_forward(t, c, p))
        torch.manual_seed(0)
        drafter = ScriptedDrafter({tuple(p): r for p, r in zip(prompts, refs)}, target.vocab_size, error=(1.0, 2.0))
        out = SpecEngine(target, drafter, gamma=5, scheduler=rule).generate_batch(prompts, 20)
        assert [g.tokens for g in out] == refs
        assert packs[0].width == max(len(p) for p in prompts)  # the prefill, packed either way
        forms[packed] = len(packs) - 1  # packed verifications
        with pytest.raises(DecodingError, match="prices"):
            SpecEngine(target, drafter, gamma=5, scheduler=rule, packed=not packed)
    assert forms[True] > 0 and forms[False] == 0


# ----- the short-query kernel (csrc/short_attention.cpp) ----------------------------------------
needs_kernel = pytest.mark.skipif(not few_rows.attention_available(), reason="needs the few-rows build and AVX-512 BF16")


def exact_attention(q, k, v, mask, scale):
    """float64 attention of the same bf16 inputs (mask bool [B, 1, T, S] or None: causal, queries last)."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


@needs_kernel
@pytest.mark.parametrize("batch,heads,kv,length,total,dim", [
    (1, 9, 3, 1, 300, 64), (1, 9, 3, 8, 301, 64), (4, 6, 2, 3, 17, 32), (2, 8, 8, 5, 1000, 128), (1, 4, 1, 16, 40, 256),
])
def test_the_kernel_gives_the_matrix_paths_result(batch, heads, kv, length, total, dim):
    """Causal without a mask, a padding mask per row (also with its keys strided), and one mask
    broadcast over the rows."""
    q = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    k, v = (torch.randn(batch, kv, total, dim, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (2, 3))
    padding = torch.ones(batch, 1, length, total, dtype=torch.bool).tril(total - length)
    padding[-1, ..., : total // 3] = False  # a left-padded row
    shared = torch.ones(1, 1, length, total + 4, dtype=torch.bool).tril(total - length)  # longer than the keys
    strided = padding.transpose(-1, -2).contiguous().transpose(-1, -2)  # keys not adjacent in memory
    for mask in (None, padding, shared, strided):
        given = None if mask is None else mask[..., :total]
        want = att._grouped_attention(q, k, v, given, dim**-0.5)
        assert att.kernel_takes(q, k, v, mask)
        ours = att._short_attention(q, k, v, mask)
        # the same roundings, summed in another order: equal to the bit almost everywhere, and as
        # close to the exact result as the matrix path is
        assert (ours == want).float().mean() >= 0.99
        exact = exact_attention(q, k, v, given, dim**-0.5)
        ours_err, want_err = (ours.double() - exact).abs(), (want.double() - exact).abs()
        assert ours_err.max() <= 1.5 * want_err.max() and ours_err.mean() <= 1.1 * want_err.mean()


@needs_kernel
def test_a_query_gets_the_same_bits_alone_as_in_a_verified_block_or_a_batch():
    """What keeps decoding lossless: a token's attention in a block of 7 (causal), in a batch of
    rows, or on its own over its prefix is the same to the bit."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 9, 7, 64, generator=g).bfloat16()
    k, v = (torch.randn(3, 3, 290, 64, generator=g).bfloat16() for _ in range(2))
    block = att._short_attention(q, k, v, None)
    for row in range(3):
        for t in range(7):
            end = 290 - 7 + t + 1
            alone = att._short_attention(q[row : row + 1, :, t : t + 1], k[row : row + 1, :, :end], v[row : row + 1, :, :end], None)
            assert torch.equal(alone[0, :, 0], block[row, :, t])


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
def test_rows_of_their_own_lengths_get_the_bits_of_the_whole_block(masked):
    """Packed verification: the kernel computes only each row's first tokens[b] queries (none for
    a row of 0), and those are the whole block's outputs to the bit."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 9, 8, 64, generator=g).bfloat16()
    k, v = (torch.randn(5, 3, 300, 64, generator=g).bfloat16() for _ in range(2))
    mask = None
    if masked:
        mask = torch.ones(5, 1, 8, 300, dtype=torch.bool).tril(300 - 8)
        mask[1, ..., :40] = False  # a left-padded row
    tokens = torch.tensor([8, 3, 1, 0, 5])
    whole = att._short_attention(q, k, v, mask)
    rows = att._short_attention(q, k, v, mask, tokens=tokens)
    for b, n in enumerate(tokens.tolist()):
        assert torch.equal(rows[b, :, :n], whole[b, :, :n])
    with pytest.raises(RuntimeError, match="between 0 and T"):
        att._short_attention(q, k, v, mask, tokens=torch.tensor([9, 1, 1, 1, 1]))


@needs_kernel
def test_the_kernel_leaves_what_it_does_not_take_to_the_matrix_path():
    q, k, v = random_attention(1, 4, 2, 3, 30, torch.bfloat16)  # head size 16
    assert not att.kernel_takes(q, k, v, None)
    q, k, v = (torch.randn(1, 4, n, 64).bfloat16() for n in (3, 30, 30))
    k2, v2 = (torch.randn(1, 2, 30, 64).bfloat16() for _ in range(2))
    assert att.kernel_takes(q, k2, v2, None)
    assert not att.kernel_takes(q.float(), k2.float(), v2.float(), None)
    assert not att.kernel_takes(q, k2.transpose(2, 3).contiguous().transpose(2, 3), v2, None)  # keys not row-major
    assert not att.kernel_takes(q, k2, v2, torch.ones(1, 4, 3, 30, dtype=torch.bool))  # a mask per head


@needs_kernel
def test_greedy_speculative_decoding_through_the_attention_kernel_is_plain_decoding(tmp_path, monkeypatch):
    """A bf16 target with 32-wide heads: every decoding step and verification attends through the
    kernel, and the speculative answer is the plain one token for token."""
    target = wide_bf16_target()
    taken = []
    real = att.kernel_takes
    monkeypatch.setattr(att, "kernel_takes", lambda *a: taken.append(real(*a)) or taken[-1])
    assert_speculative_is_plain(target)
    assert taken and all(taken)


@needs_kernel
def test_a_bf16_proposal_block_attends_through_the_kernel_like_sdpa(monkeypatch):
    """A drafter's inference block (every context key visible, the block bidirectional)."""
    from drafter.models.layers import block_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 7, 64, generator=g).bfloat16()
    k_ctx, v_ctx = (torch.randn(1, 3, 300, 64, generator=g).bfloat16() for _ in range(2))
    k_blk, v_blk = (torch.randn(1, 3, 1, 7, 64, generator=g).bfloat16() for _ in range(2))
    ours = block_attention(q, k_ctx, v_ctx, k_blk, v_blk, None, 0.125)
    k, v = torch.cat([k_ctx, k_blk[:, :, 0]], 2), torch.cat([v_ctx, v_blk[:, :, 0]], 2)
    visible = torch.ones(1, 1, 7, 307, dtype=torch.bool)
    # the matrix path's roundings (scores and probabilities in bf16; SDPA keeps them in float32)
    want = att._grouped_attention(q[:, :, 0], k, v, visible, 0.125)
    assert (ours[:, :, 0] == want).float().mean() >= 0.99
    exact = exact_attention(q[:, :, 0], k, v, visible, 0.125)
    assert (ours[:, :, 0].double() - exact).abs().max() <= 1.5 * (want.double() - exact).abs().max()
    sdpa = F.scaled_dot_product_attention(q[:, :, 0], k, v, scale=0.125, enable_gqa=True)
    monkeypatch.setattr("drafter.models.layers.kernel_takes", lambda *a: False)
    assert torch.equal(block_attention(q, k_ctx, v_ctx, k_blk, v_blk, None, 0.125)[:, :, 0], sdpa)


def test_roomy_layer_holds_what_concatenation_holds_and_writes_in_place():
    """The engine's cache operations (update, crop, dropping leading columns, shifting a row in
    place, selecting rows) on a RoomyLayer and on transformers' DynamicLayer give the same keys
    and values; steps that fit write into the same buffer (no copy of the cache)."""
    from transformers.cache_utils import DynamicLayer

    from drafter.attention import RoomyLayer

    gen = torch.Generator().manual_seed(0)
    roomy, plain = RoomyLayer(), DynamicLayer()

    def step(width, rows=4):
        k, v = torch.randn(rows, 2, width, 8, generator=gen), torch.randn(rows, 2, width, 8, generator=gen)
        got, want = roomy.update(k, v), plain.update(k, v)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert roomy.keys.stride(-1) == 1 and roomy.keys.stride(-2) == 8  # each head's S x D block contiguous

    step(30)
    first = roomy._buffers[0]  # held, so a later buffer cannot be allocated at its address
    buffer = first.data_ptr()
    for width in (5, 3, 8, 1):
        step(width)
        for layer in (roomy, plain):
            layer.crop(-2)
    assert roomy._buffers[0].data_ptr() == buffer  # every step fit: written in place
    for layer in (roomy, plain):  # the engine's _trim and _realign
        layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]
        for t in (layer.keys, layer.values):
            t[1, :, 2:] = t[1, :, :-2].clone()
    step(4)
    assert roomy._buffers[0].data_ptr() == buffer
    for _ in range(40):  # past the room: a new buffer, the cached slots copied over
        step(7)
    assert roomy._buffers[0].data_ptr() != buffer and roomy._buffers[0] is not first
    for layer in (roomy, plain):
        layer.batch_select_indices(torch.tensor([0, 2, 3]))
    step(6, rows=3)
    step(2, rows=3)
    assert roomy.get_seq_length() == plain.get_seq_length()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_shifts_move_each_rows_slots_as_slice_copies_do(monkeypatch, dtype):
    """`shift_rows` (a memmove per row and head where the kernels are built) leaves the cache's
    views exactly as the slice copies through a temporary do, and the buffer past them untouched."""
    g = torch.Generator().manual_seed(5)
    buffers = [torch.randn(4, 3, 40, 64, generator=g).to(dtype) for _ in range(2)]
    shifts = [(0, 3, 0), (2, 1, 17), (3, 7, 5)]
    views = [b[:, :, :31] for b in buffers]
    want = [b.clone() for b in buffers]
    for t in (w[:, :, :31] for w in want):
        for r, j, first in shifts:
            t[r, :, first + j :] = t[r, :, first : 31 - j].clone()
    att.shift_rows(views, shifts)
    for b, w in zip(buffers, want):
        assert torch.equal(b, w)
    monkeypatch.setattr(few_rows, "available", lambda: False)  # the slice path gives the same
    again = [b.clone() for b in buffers]
    att.shift_rows([a[:, :, :31] for a in again], shifts)
    att.shift_rows(views, shifts)
    for a, b in zip(again, buffers):
        assert torch.equal(a, b)
