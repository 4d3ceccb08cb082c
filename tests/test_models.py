"""Tests that pin the drafter algorithms (ALGORITHMS.md sections 3-5) and their surface."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from drafter.config import load_config
from drafter.models import TargetHeads, TrainBatch, build, load_drafter, model_class
from drafter.models.dflash import DFlash, heads_off
from drafter.models.dspark import BlockLayout, DSpark, sample_anchors
from drafter.models.layers import block_attention
from drafter.models.metrics import acceptance, simulated_tau
from drafter.models.speculators_format import DrafterFormatError
from tests.conftest import ROOT
from tests.tiny_data import collate, make_dataset, sharp_target

ALGOS = ["dspark", "dflash", "eagle3"]


@pytest.fixture(scope="module")
def target():
    return sharp_target()


@pytest.fixture(scope="module")
def heads(target):
    return TargetHeads.from_target(target)


@pytest.fixture(scope="module")
def batch(target):
    ds = make_dataset(target, 4, answer_len=24, seed=3)
    return collate([ds[i] for i in range(4)])


def make(target, heads, algo, *sets, counts=None):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"drafter.algorithm={algo}", *sets])
    torch.manual_seed(0)
    return build(cfg, heads, target.layer_ids, counts).eval()


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ----- the block layout ----------------------------------------------------------------------
def test_block_mask_hand_made_case():
    """T=5 context, anchors at 1 and 3, blocks of 2, the last position is padding."""
    anchors = torch.tensor([[1, 3]])
    layout = BlockLayout(anchors, torch.tensor([[True, True]]), torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool), 2)
    #                    context   | block 0 | block 1
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 1, 1, 0, 0],  # block 0 (anchor 1), slot 0: sees position 0 only
        [1, 0, 0, 0, 0, 1, 1, 0, 0],  # block 0, slot 1
        [1, 1, 1, 0, 0, 0, 0, 1, 1],  # block 1 (anchor 3), slot 0: positions 0..2
        [1, 1, 1, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(layout.dense()[0], expected)
    assert torch.equal(layout.positions, torch.tensor([[[1, 2], [3, 4]]]))
    # valid slots: the contiguous in-bounds assistant prefix after the anchor
    # (slot k of the block at p predicts position p+k+1)
    ok = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(layout.slot_valid(ok), torch.tensor([[[True, True], [False, False]]]))
    ok = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool)  # a gap cuts block 0; block 1 runs off the end
    assert torch.equal(layout.slot_valid(ok), torch.tensor([[[False, False], [True, False]]]))


def test_block_attention_implements_the_dense_mask():
    """The memory-saving block attention equals plain attention under `dense()`."""
    torch.manual_seed(0)
    b, heads_, kv, T, A, S, d = 2, 4, 2, 7, 3, 3, 8
    anchors = torch.tensor([[1, 3, 5], [2, 4, 4]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    attn_mask = torch.ones(b, T, dtype=torch.bool)
    attn_mask[1, 6:] = False
    layout = BlockLayout(anchors, valid, attn_mask, S)
    q = torch.randn(b, heads_, A, S, d)
    k_ctx, v_ctx = torch.randn(b, kv, T, d), torch.randn(b, kv, T, d)
    k_blk, v_blk = torch.randn(b, kv, A, S, d), torch.randn(b, kv, A, S, d)
    got = block_attention(q, k_ctx, v_ctx, k_blk, v_blk, layout.ctx_visible, d**-0.5)
    keys = torch.cat([k_ctx, k_blk.flatten(2, 3)], 2).repeat_interleave(heads_ // kv, 1)
    values = torch.cat([v_ctx, v_blk.flatten(2, 3)], 2).repeat_interleave(heads_ // kv, 1)
    ref = F.scaled_dot_product_attention(q.flatten(2, 3), keys, values, attn_mask=layout.dense()[:, None])
    torch.testing.assert_close(got.flatten(2, 3), ref, rtol=1e-5, atol=1e-5)
    # inference: one block per row that sees its whole context (None), a fused kernel
    one = [x[:, :, :1] for x in (q, k_blk, v_blk)]
    everything = torch.ones(b, 1, T, dtype=torch.bool)
    fused = block_attention(one[0], k_ctx, v_ctx, one[1], one[2], None, d**-0.5)
    masked = block_attention(one[0], k_ctx, v_ctx, one[1], one[2], everything, d**-0.5)
    torch.testing.assert_close(fused, masked, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one block per row"):
        block_attention(q, k_ctx, v_ctx, k_blk, v_blk, None, d**-0.5)


def test_anchors_are_assistant_pairs_capped_and_per_sequence():
    loss = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    attn = torch.ones_like(loss)
    attn[1, 4:] = False
    anchors, valid = sample_anchors(loss, attn, 100, None)
    assert anchors[0][valid[0]].tolist() == [1, 2, 5, 6, 7]  # p and p+1 assistant
    assert anchors[1][valid[1]].tolist() == [0]  # (3, 4) fails: 4 is padding
    capped, cvalid = sample_anchors(loss, attn, 2, gens(2))
    assert cvalid.sum(1).tolist() == [2, 1]
    assert set(capped[0].tolist()) <= {1, 2, 5, 6, 7}
    # a sequence's anchors depend on its own generator only, not on its batch neighbours
    alone, _ = sample_anchors(loss[:1], attn[:1], 2, gens(1))
    assert torch.equal(alone[0], capped[0])


# ----- DSpark heads and objective -------------------------------------------------------------
@pytest.mark.parametrize("head_type", ["vanilla", "gated"])
def test_markov_bias(target, heads, head_type):
    model = make(target, heads, "dspark", f"drafter.markov_head_type={head_type}")
    head = model.markov_head
    prev = torch.tensor([5, 17, 5, 300])
    hidden = torch.randn(4, heads.hidden_size)
    bias, emb = head(prev, hidden)
    w1 = head.markov_w1.weight[prev]
    torch.testing.assert_close(emb, w1)
    if head_type == "vanilla":  # B = W2(W1[prev]), independent of the hidden state
        torch.testing.assert_close(bias, w1 @ head.markov_w2.weight.T)
        torch.testing.assert_close(bias[0], bias[2])
    else:  # gated: W1 x scaled by sigmoid(gate([h; W1 x]))
        gate = torch.sigmoid(head.gate_proj(torch.cat([hidden, w1], -1)))
        torch.testing.assert_close(bias, (gate * w1) @ head.markov_w2.weight.T)


def test_markov_bias_rows_are_remembered_while_w2_is_unchanged(target, heads, batch, monkeypatch):
    """Drafting one token at a time keeps each previous token's bias row: the same bits as the
    product, recomputed once W2 changes in place, never with gradients, at most MEMO_BYTES."""
    import drafter.models.dspark as dspark

    model = make(target, heads, "dspark")
    head = model.markov_head
    hidden = torch.randn(1, heads.hidden_size)
    prev = torch.tensor([17])
    with torch.no_grad():
        first, _ = head(prev, hidden)
        again, _ = head(prev, hidden)
        assert torch.equal(first, head.markov_w1(prev) @ head.markov_w2.weight.T)
        assert again.data_ptr() == first.data_ptr()  # the kept row
        rows, _ = head(torch.tensor([17, 23]), hidden.expand(2, -1))  # requests drafted together: one row each
        assert torch.equal(rows[0], first[0]) and torch.equal(rows[1:], head.markov_w1(torch.tensor([23])) @ head.markov_w2.weight.T)
        head.markov_w2.weight.add_(0.5)  # an optimizer step
        updated, _ = head(prev, hidden)
        assert torch.equal(updated, head.markov_w1(prev) @ head.markov_w2.weight.T) and not torch.equal(updated, first)
    trained, _ = head(prev, hidden)
    assert trained.requires_grad and trained.data_ptr() != updated.data_ptr()

    state = model.init_state()
    model.extend(state, batch.features[:1, :10], batch.input_ids[:1, :10])
    anchors = batch.input_ids[0, 10:16]
    monkeypatch.setattr(dspark, "MEMO_BYTES", 0)
    head.forget()
    plain = [model.propose(state, a[None], 3, 0.0).tokens for a in anchors]
    assert head._memo == {}
    monkeypatch.setattr(dspark, "MEMO_BYTES", 3 * model.draft_vocab_size * 4)  # three float32 rows
    for _ in range(2):  # rows computed, then read back
        assert all(torch.equal(model.propose(state, a[None], 3, 0.0).tokens, p) for a, p in zip(anchors, plain))
    assert len(head._memo) == 3


@pytest.mark.parametrize("head_type", ["vanilla", "gated"])
def test_markov_teacher_forced_equals_step_by_step(target, heads, batch, head_type):
    """Sampling left to right (propose) and one teacher-forced pass over the sampled
    tokens (training) give the same corrected logits at every position."""
    model = make(target, heads, "dspark", f"drafter.markov_head_type={head_type}", "drafter.block_size=5")
    state = model.init_state()
    model.extend(state, batch.features[:1, :10], batch.input_ids[:1, :10])
    anchor = batch.input_ids[0, 10:11]
    prop = model.propose(state, anchor, 5, 1.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.block_hidden(
            model.block_ids(anchor[None]), (10 + torch.arange(5))[None, None],
            list(zip(state.k, state.v)), torch.ones(1, 1, 10, dtype=torch.bool),
        )[0, 0]
        prev = torch.cat([anchor, prop.tokens[0, :-1]])  # x_0 = anchor, then the sampled tokens
        logits, emb = model.draft_logits(hidden, prev)
        conf = torch.sigmoid(model.confidence_logit(hidden, emb))
    torch.testing.assert_close(torch.softmax(logits, -1), prop.probs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conf, prop.confidences[0], rtol=1e-5, atol=1e-6)


def test_acceptance_label_is_one_minus_half_l1():
    p_d = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    p_t = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(acceptance(p_d, p_t), torch.tensor([0.5, 1.0]))
    assert simulated_tau([1.0, 1.0, 1.0]) == 4.0
    assert simulated_tau([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)


@pytest.mark.parametrize("ce_target", ["sampled", "greedy"])
def test_dspark_objective_recomputed_by_hand(target, heads, batch, ce_target):
    """L = 0.1 CE + 0.9 TV(full L1) + 1.0 BCE(c, 1 - 0.5 L1), weights exp(-k/4), mean over
    valid slots, with p_d after the Markov bias and p_t from the target's final state. The CE
    token is the data's next token, or with ce_target=greedy the target's argmax."""
    model = make(target, heads, "dspark", f"drafter.ce_target={ce_target}")
    with torch.no_grad():
        out = model.forward_train(batch, generator=gens(4))
        anchors, valid = sample_anchors(batch.loss_mask, batch.attention_mask, model.config.max_anchors, gens(4))
        layout = BlockLayout(anchors, valid, batch.attention_mask, model.config.block_size)
        hidden = model.training_hidden(batch, layout)
        slots = layout.slot_valid(batch.loss_mask & batch.attention_mask)
        ce = tv = bce = 0.0
        n = differ = 0
        for b, a, k in slots.nonzero().tolist():
            p = anchors[b, a].item()
            h = hidden[b, a, k]
            logits = heads.logits(h) + model.markov_head.markov_w2(model.markov_head.markov_w1(batch.input_ids[b, p + k]))
            p_d = torch.softmax(logits, -1)
            p_t = torch.softmax(heads.logits(batch.final_hidden[b, p + k]), -1)
            w = torch.exp(torch.tensor(-k / 4.0))
            l1 = (p_d - p_t).abs().sum()
            c = torch.sigmoid(model.confidence_head.proj(torch.cat([h, model.markov_head.markov_w1.weight[batch.input_ids[b, p + k]]])))
            label = 1 - 0.5 * l1
            gold = batch.input_ids[b, p + k + 1].item()
            differ += gold != p_t.argmax().item()
            ce += w * -torch.log(p_d[p_t.argmax() if ce_target == "greedy" else gold])
            tv += w * l1
            bce += w * -(label * torch.log(c) + (1 - label) * torch.log(1 - c))
            n += 1
    assert n == int(out.metrics["count"].sum()) > 10 and differ > 0  # the two CE targets differ
    torch.testing.assert_close(out.losses["ce"], 0.1 * ce / n, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.losses["tv"], 0.9 * tv / n, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.losses["bce"], (1.0 * bce / n).squeeze(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, out.losses["ce"] + out.losses["tv"] + out.losses["bce"])


def test_dflash_is_dspark_with_heads_off(target, heads, batch):
    dspark = make(target, heads, "dspark")
    dflash = make(target, heads, "dflash")
    assert type(dflash) is DFlash and isinstance(dflash, DSpark)
    assert dflash.markov_head is None and dflash.confidence_head is None
    backbone = {k: v for k, v in dspark.state_dict().items() if not k.startswith(("markov_head", "confidence_head"))}
    dflash.load_state_dict(backbone)  # strict: exactly the backbone's weights
    # DSpark with a zero Markov bias drafts exactly DFlash's distributions
    with torch.no_grad():
        dspark.markov_head.markov_w2.weight.zero_()
    for model in (dspark, dflash):
        model.state = model.init_state()
        model.extend(model.state, batch.features[:1, :12], batch.input_ids[:1, :12])
    a = dspark.propose(dspark.state, batch.input_ids[0, 12:13], 4, 1.0, torch.Generator().manual_seed(0))
    b = dflash.propose(dflash.state, batch.input_ids[0, 12:13], 4, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.probs, b.probs)
    assert torch.equal(a.tokens, b.tokens) and b.confidences is None
    # ... and DSpark configured with the heads off trains exactly like DFlash (CE only)
    off = DSpark(heads_off(dspark.config), heads)
    off.load_state_dict(backbone)
    with torch.no_grad():
        lo, ld = off.forward_train(batch, generator=gens(4)), dflash.forward_train(batch, generator=gens(4))
    assert set(ld.losses) == {"ce"}
    torch.testing.assert_close(lo.loss, ld.loss)
    with pytest.raises(ValueError, match="heads off"):
        DFlash(dspark.config, heads)


# ----- every algorithm --------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGOS)
def test_only_trainable_parameters_get_gradients(target, heads, batch, algo):
    model = make(target, heads, algo).train()
    model.forward_train(batch, generator=gens(4)).loss.backward()
    frozen = list(target.model.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert not any(p is q for p in model.parameters() for q in frozen)  # embedding/LM head not owned
    names = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == [], f"parameters without gradient: {names}"


@pytest.mark.parametrize("algo", ALGOS)
def test_propose_matches_training_forward(target, heads, batch, algo):
    """The distribution propose returns for draft k equals the training forward's for the
    same context (the drafted tokens teacher-forced), and propose leaves the state alone."""
    model = make(target, heads, algo)
    L, g = 9, 3
    # a sequence whose continuation after the anchor is what the drafter will sample
    state = model.init_state()
    model.extend(state, batch.features[:1, :L], batch.input_ids[:1, :L])
    before = [t.clone() for t in (state.k if isinstance(state.k, list) else [state.k])]
    prop = model.propose(state, batch.input_ids[0, L : L + 1], g, 1.0, torch.Generator().manual_seed(2))
    after = state.k if isinstance(state.k, list) else [state.k]
    assert state.length == L and all(torch.equal(x, y) for x, y in zip(before, after))

    def training_probs(drafted: torch.Tensor) -> torch.Tensor:
        """The training forward's distributions [g, V] with `drafted` [1, g] teacher-forced."""
        ids = torch.cat([batch.input_ids[:1, : L + 1], drafted, torch.tensor([[7]])], 1)
        feats = target.capture(ids)
        seq = TrainBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool),
                         feats.layers, feats.final)
        with torch.no_grad():
            if algo == "eagle3":
                outs = model.ttt_hidden(seq)  # index L-1 <-> position L (the anchor)
                return torch.stack([torch.softmax(model.vocab_logits(outs[i][0, L - 1]), -1) for i in range(g)])
            layout = BlockLayout(torch.tensor([[L]]), torch.tensor([[True]]), seq.attention_mask, model.config.block_size)
            hidden = model.training_hidden(seq, layout)[0, 0, :g]
            logits, _ = model.draft_logits(hidden, ids[0, L : L + g])
            return torch.softmax(logits, -1)

    torch.testing.assert_close(training_probs(prop.tokens), prop.probs[0], rtol=1e-4, atol=1e-6)
    # temperature 0: each draft is the argmax, and no distributions (verification compares tokens)
    greedy = model.propose(state, batch.input_ids[0, L : L + 1], g, 0.0)
    assert greedy.probs is None
    assert torch.equal(training_probs(greedy.tokens).argmax(-1), greedy.tokens[0])


@pytest.mark.parametrize("algo", ALGOS)
def test_rows_drafted_together_get_the_proposals_they_get_alone(target, heads, batch, algo):
    """`extend_batch` gives each row the state `extend` gives it alone; `propose_batch` over rows
    of different context lengths (padded, masked) and different gammas: greedy, each row's tokens
    and confidences are its own `propose`'s; sampled, its distributions are too wherever they do
    not depend on the row's own earlier draws."""
    model = make(target, heads, algo)
    lengths, gammas = [5, 13, 9], [3, 2, 3]
    states, joint = [], [model.init_state() for _ in lengths]
    for i, n in enumerate(lengths):
        states.append(model.init_state())
        model.extend(states[-1], batch.features[i : i + 1, :n], batch.input_ids[i : i + 1, :n])
    # extended together (each row its own positions), in two steps: the states are the rows' own
    for cut in ([2, 6, 1], lengths):
        model.extend_batch(joint, [batch.features[i : i + 1, s.length : c] for i, (s, c) in enumerate(zip(joint, cut))],
                           [batch.input_ids[i : i + 1, s.length : c] for i, (s, c) in enumerate(zip(joint, cut))])
    for alone, together in zip(states, joint):
        assert together.length == alone.length
        for name in ("k", "v"):
            torch.testing.assert_close(getattr(together, name), getattr(alone, name), rtol=1e-4, atol=1e-5)
    anchors = torch.stack([batch.input_ids[i, n] for i, n in enumerate(lengths)])
    together = model.propose_batch(states, anchors, gammas, 0.0)
    for state, anchor, g, prop in zip(states, anchors, gammas, together):
        alone = model.propose(state, anchor.reshape(1), g, 0.0)
        assert prop.tokens.shape == (1, g) and torch.equal(prop.tokens, alone.tokens) and prop.probs is None
        if alone.confidences is not None:
            torch.testing.assert_close(prop.confidences, alone.confidences, rtol=1e-4, atol=1e-6)
    together = model.propose_batch(states, anchors, gammas, 1.0, torch.Generator().manual_seed(1))
    for state, anchor, g, prop in zip(states, anchors, gammas, together):
        alone = model.propose(state, anchor.reshape(1), g, 1.0, torch.Generator().manual_seed(1))
        same = g if algo == "dflash" else 1  # DSpark's Markov head and EAGLE-3 read their own draws
        torch.testing.assert_close(prop.probs[:, :same], alone.probs[:, :same], rtol=1e-4, atol=1e-6)
        assert bool((prop.probs[0].gather(1, prop.tokens[0][:, None]) > 0).all())


@pytest.mark.parametrize("algo", ALGOS)
def test_export_load_round_trip(target, heads, batch, algo, tmp_path):
    model = make(target, heads, algo)
    with torch.no_grad():  # make the weights distinct from a fresh init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.export(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == algo
    assert config["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
    layer_key = "eagle_aux_hidden_state_layer_ids" if algo == "eagle3" else "aux_hidden_state_layer_ids"
    assert config[layer_key] == [i + 1 for i in target.layer_ids]  # hidden_states numbering
    assert config["transformer_layer_config"]["hidden_size"] == heads.hidden_size
    if algo != "eagle3":
        assert config["sample_from_anchor"] is True and config["mask_token_id"] == heads.mask_token_id
    if algo == "dspark":
        assert (config["markov_rank"], config["enable_confidence_head"]) == (16, True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    frozen = {k for k in keys if k.startswith(("embed_tokens", "lm_head", "verifier"))}
    # frozen target parts stay out, except the copies speculators' EAGLE-3 loader needs
    assert frozen == ({"embed_tokens.weight", "lm_head.weight"} if algo == "eagle3" else set())
    loaded = load_drafter(tmp_path, heads)
    assert type(loaded) is model_class(algo)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    for m in (model, loaded):
        m.state = m.init_state()
        m.extend(m.state, batch.features[:1, :10], batch.input_ids[:1, :10])
    a = model.propose(model.state, batch.input_ids[0, 10:11], 3, 0.7, torch.Generator().manual_seed(0))
    b = loaded.propose(loaded.state, batch.input_ids[0, 10:11], 3, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)


def test_load_refuses_another_target(target, heads, tmp_path):
    make(target, heads, "dspark").export(tmp_path)
    other = TargetHeads.from_target(sharp_target(shape="qwen3"))  # same width, other family: fine
    load_drafter(tmp_path, other)
    config = json.loads((tmp_path / "config.json").read_text())
    config["transformer_layer_config"]["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterFormatError, match="hidden_size=128"):
        load_drafter(tmp_path, heads)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DrafterFormatError, match="model.safetensors"):
        load_drafter(tmp_path, heads)


def test_eagle3_reduced_vocabulary(target, heads, batch):
    counts = torch.bincount(batch.input_ids[batch.loss_mask], minlength=heads.vocab_size)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["drafter.algorithm=eagle3", "drafter.draft_vocab_size=64"])
    torch.manual_seed(0)
    model = build(cfg, heads, target.layer_ids, counts)
    ids = model.draft_ids
    assert model.t2d.sum() == 64 and model.t2d[ids].all() and torch.equal(ids, ids.sort().values)
    assert set(counts.topk(20).indices.tolist()) <= set(ids.tolist())  # most frequent kept
    out = model.forward_train(batch)
    full = make(target, heads, "eagle3").forward_train(batch)
    assert out.metrics["count"].sum() < full.metrics["count"].sum()  # targets outside are masked
    state = model.init_state()
    model.extend(state, batch.features[:1, :10], batch.input_ids[:1, :10])
    prop = model.propose(state, batch.input_ids[0, 10:11], 3, 1.0, torch.Generator().manual_seed(0))
    assert prop.probs.shape == (1, 3, heads.vocab_size)
    assert prop.probs[0][:, ~model.t2d].sum() == 0 and model.t2d[prop.tokens].all()
    torch.testing.assert_close(prop.probs.sum(-1), torch.ones(1, 3))


@pytest.mark.parametrize("algo", ALGOS)
def test_other_target_families(tiny_target_any, algo):
    """Qwen3 (q/k norms) and Gemma3 (scaled embeddings, soft-capping, sliding windows)."""
    target = tiny_target_any
    heads = TargetHeads.from_target(target)
    ds = make_dataset(target, 2, answer_len=10, seed=0)
    b = collate([ds[0], ds[1]])
    model = make(target, heads, algo)
    out = model.forward_train(b)
    assert torch.isfinite(out.loss) and out.metrics["count"].sum() > 0
    state = model.init_state()
    model.extend(state, b.features[:1, :8], b.input_ids[:1, :8])
    prop = model.propose(state, b.input_ids[0, 8:9], 3, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(prop.probs.sum(-1), torch.ones(1, 3))


def test_eagle3_chain_unroll_equals_the_full_unroll(target, heads, batch):
    """Unrolling only the sampled chains gives exactly the full unroll's rows."""
    model = make(target, heads, "eagle3")
    chains = torch.tensor([[0, 5, 9], [2, 3, 17]])
    sub = batch.__class__(batch.input_ids[:2], batch.loss_mask[:2], batch.attention_mask[:2], batch.features[:2],
                          batch.final_hidden[:2])
    with torch.no_grad():
        full, part = model.ttt_hidden(sub), model.ttt_hidden(sub, chains)
    for f, p in zip(full, part):
        torch.testing.assert_close(p, f.gather(1, chains[..., None].expand(-1, -1, f.shape[-1])), rtol=1e-5, atol=1e-5)
