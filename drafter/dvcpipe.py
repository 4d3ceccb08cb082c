"""DVC glue: `params.yaml` is the run config the DVC stages read; `dvc.lock` gives lineage hashes.

One source of truth: every stage in `dvc.yaml` runs `drafter <stage> -c params.yaml`, and
lists the config sections it depends on under `params:`, so DVC re-runs exactly the
stages whose sections changed. DVC needs every listed section present in params.yaml,
so it holds the full resolved config (`drafter params -c configs/X.yaml` writes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from drafter.config import BUNDLED_EVAL_DIR, Config
from drafter.manifest import atomic_write_text

HEADER = (
    "# The run config the DVC stages read (`drafter <stage> -c params.yaml`), all sections resolved.\n"
    "# Regenerate from a config: drafter params -c configs/<run>.yaml --out params.yaml\n"
)


def params_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config, without machine-specific defaults (the bundled eval-set path)."""
    data = cfg.to_dict()
    if [Path(p) for p in data["ingest"]["eval_sets"]] == [BUNDLED_EVAL_DIR]:
        del data["ingest"]["eval_sets"]  # the default applies wherever the package is installed
    return data


def write_params(cfg: Config, path: str | Path = "params.yaml") -> Path:
    return atomic_write_text(Path(path), HEADER + yaml.safe_dump(params_dict(cfg), sort_keys=False))


def dvc_lock_hashes(lock_path: str | Path) -> dict[str, str]:
    """`{path: md5}` of every stage output (and dependency) recorded in `dvc.lock`."""
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    hashes: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in (stage.get("deps") or []) + (stage.get("outs") or []):
            digest = entry.get("md5") or entry.get("etag") or entry.get("checksum")
            if entry.get("path") and digest:
                hashes[entry["path"]] = str(digest)
    return hashes
