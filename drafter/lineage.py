"""Lineage of a candidate drafter: what it was trained from, with which code and settings.

Collected from the stage manifests under `data/`, the target's fingerprint, the config
hash, git and package versions, and DVC's `dvc.lock` when the pipeline ran under DVC.
The registry stores it as version tags (flat `lineage.*` keys) and as `lineage.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drafter import __version__
from drafter.config import Config
from drafter.dvcpipe import dvc_lock_hashes
from drafter.manifest import git_state, package_versions, sha256_file

# Stage output folders under run.data_dir, in pipeline order.
STAGE_DIRS = ("ingested", "regenerated", "cache", "drafter", "calibration", "eval")
_FINGERPRINT_KEYS = ("target_fingerprint", "fingerprint")
_TEMPLATE_KEYS = ("template_hash",)


def _find_key(obj: Any, keys: tuple[str, ...]) -> Any:
    """First value under any of `keys`, searching nested dicts and lists depth-first."""
    if isinstance(obj, dict):
        for key in keys:
            if key in obj and isinstance(obj[key], (str, int)):
                return obj[key]
        for value in obj.values():
            found = _find_key(value, keys)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for value in obj:
            found = _find_key(value, keys)
            if found is not None:
                return found
    return None


def collect_lineage(
    cfg: Config,
    data_dir: str | Path | None = None,
    target: Any = None,
    dvc_root: str | Path = ".",
) -> dict[str, Any]:
    """Everything needed to say where a drafter came from (all values JSON-able)."""
    data_dir = Path(data_dir) if data_dir is not None else cfg.data_dir
    manifests: dict[str, dict] = {}
    manifest_hashes: dict[str, str] = {}
    for stage in STAGE_DIRS:
        path = data_dir / stage / "manifest.json"
        if path.is_file():
            manifests[stage] = json.loads(path.read_text())
            manifest_hashes[stage] = sha256_file(path)[:16]
    cache_keys = {}
    for split in ("train", "holdout"):
        pointer = data_dir / "cache" / f"{split}.json"
        if pointer.is_file():
            cache_keys[split] = json.loads(pointer.read_text()).get("key")
            manifests.setdefault(f"cache_{split}", json.loads(pointer.read_text()))

    if target is not None:
        fingerprint, template = target.fingerprint, target.template_hash[:16]
    else:  # the stages record the target they ran against
        fingerprint = _find_key(manifests, _FINGERPRINT_KEYS)
        template = _find_key(manifests, _TEMPLATE_KEYS)
    git = git_state(Path(__file__).parent)  # the drafter code that produced it
    return {
        "run_name": cfg.run.name,
        "target_name": _target_name(cfg),
        "target_fingerprint": fingerprint,
        "template_hash": template,
        "config_hash": cfg.hash(),
        "algorithm": cfg.drafter.algorithm,
        "block_size": cfg.drafter.block_size,
        "manifests": manifest_hashes,
        "cache_keys": cache_keys,
        "dvc": dvc_lock_hashes(Path(dvc_root) / "dvc.lock"),
        "code": {"drafter": __version__, "git_commit": git["commit"], "git_dirty": git["dirty"]},
        "packages": package_versions(),
    }


def lineage_tags(lineage: dict[str, Any], prefix: str = "lineage.") -> dict[str, str]:
    """Flatten to `lineage.a.b = value` string tags (MLflow tag values are strings)."""
    tags: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif node is not None:
            tags[prefix + key] = str(node)[:5000]

    walk(lineage, "")
    return tags


def _target_name(cfg: Config) -> str:
    from drafter.target_files import _name_for

    return _name_for(cfg.target)


def domain_counts(path: str | Path, splits: tuple[str, ...] = ("train",)) -> dict[str, int]:
    """Domain distribution of Conversation records: an ingested folder (HF datasets per split)
    or a JSONL file/folder of records with a `domain` field."""
    path = Path(path)
    counts: dict[str, int] = {}
    if path.is_dir() and any((path / s).is_dir() for s in splits):
        from datasets import load_from_disk

        for split in splits:
            if (path / split).is_dir():
                for domain in load_from_disk(str(path / split))["domain"]:
                    counts[str(domain)] = counts.get(str(domain), 0) + 1
        return counts
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    for file in files:
        with file.open() as f:
            for line in f:
                if line.strip():
                    domain = str(json.loads(line).get("domain") or "other")
                    counts[domain] = counts.get(domain, 0) + 1
    return counts
