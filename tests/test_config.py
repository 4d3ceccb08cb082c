from pathlib import Path

import pytest

from drafter.config import ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_validate():
    default = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml")
    assert default.target.source == "gguf-package" and default.drafter.algorithm == "dspark"
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert tiny.target.source == "tiny" and tiny.target.tiny.num_layers == 6


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lrr: 0.1\n", "train.lrr"),  # unknown key
        ("bogus:\n  a: 1\n", "bogus"),  # unknown section
        ("train:\n  lr: fast\n", "train.lr"),  # wrong type
        ("train:\n  lr: -1\n", "train.lr"),  # impossible value
        ("drafter:\n  algorithm: medusa\n", "drafter.algorithm"),
        ("target:\n  layer_ids: [1, 1]\n", "target"),  # repeated layer
        ("target:\n  source: hf-folder\n", "target"),  # hf-folder without a path
        ("ingest:\n  min_tokens: 100\n  max_tokens: 50\n", "ingest"),
        ("regenerate:\n  backend: openai\n", "regenerate"),  # openai without base_url
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"  {key}" in message


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=3e-4", "drafter.algorithm=eagle3", "target.layer_ids=[1,2,3]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.drafter.algorithm == "eagle3"
    assert cfg.target.layer_ids == [1, 2, 3]
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["train.lr"])


def test_feature_layer_beyond_depth_names_key_and_file(tiny_config):
    from drafter.target import load_target

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["target.layer_ids=[1,6]"])
    with pytest.raises(ConfigError) as info:
        load_target(cfg)
    assert "target.layer_ids.1" in str(info.value) and "configs/tiny.yaml" in str(info.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.lr=0.01"])
    saved = cfg.save(tmp_path / "config.yaml")
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()
    assert again.hash() == cfg.hash()
    assert load_config(saved, ["train.lr=0.02"]).hash() != cfg.hash()


def test_yaml_1_1_words_stay_strings(tmp_path):
    """`no`, `off`, `yes` are strings (YAML 1.2), so string settings such as
    train.mixed_precision=no arrive as written; only true/false are booleans."""
    cfg = load_config(None, ["train.mixed_precision=no", "train.system_metrics=false", "run.name=off"])
    assert (cfg.train.mixed_precision, cfg.train.system_metrics, cfg.run.name) == ("no", False, "off")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n  system_metrics: False\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.train.system_metrics is False
    assert parse_overrides(["a.b=yes", "a.c=true", "a.d=3"]) == {"a": {"b": "yes", "c": True, "d": 3}}
