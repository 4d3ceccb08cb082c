"""Manifests, content hashes, atomic writes and provenance: the accounting every stage shares.

Every stage writes `manifest.json` next to its output: inputs with their content
hashes, parameters, counts, durations and provenance (command, git state, package
versions). The manifest is what MLflow logs and what the registry's lineage points to.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from drafter.errors import DrafterError

if TYPE_CHECKING:
    from drafter.reports import Manifest

TRACKED_PACKAGES = (
    "drafter", "torch", "transformers", "datasets", "accelerate", "prefect", "mlflow", "dvc",
    "great-expectations", "huggingface-hub", "safetensors", "gguf",
)


class AccountingError(DrafterError, RuntimeError):
    """Counts that should add up do not: something was lost or counted twice."""


class OutputDirError(DrafterError, FileExistsError):
    """An output folder that is not safe to replace (not written by drafter)."""


# ----- credentials in URLs -------------------------------------------------------------------
REDACTED = "REDACTED"
# Query parameters that carry secrets: api_key, token, access_token, X-Amz-Signature, password, ...
_SECRET_PARAM = re.compile(r"key|token|secret|passw|pwd|auth|sig|credential|session", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """`url` without credentials: user:password@ and secret-looking query values become REDACTED."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="/:")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_urls(obj: Any) -> Any:
    """`obj` (str, dict, list) with every URL inside it passed through `redact_url`."""
    if isinstance(obj, str):
        return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), obj) if "://" in obj else obj
    if isinstance(obj, dict):
        return {k: redact_urls(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_urls(v) for v in obj]
    return obj


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def sha256_tree(root: str | Path, pattern: str = "**/*") -> str:
    """Hash of a folder: relative paths and file contents, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.glob(pattern) if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def strict_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float as None: what strict JSON readers (jq, JavaScript,
    DVC) can read. An undefined figure (a ratio over no rounds) is written as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content: a hard link (no copy) where the filesystem allows it, else a
    copy; either way `dst` appears whole (written beside it, then renamed)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(strict_json(obj), indent=2, sort_keys=False, default=str, allow_nan=False)
    return atomic_write_text(path, text + "\n")


# A folder atomic_dir published carries this file; only such folders are replaced without force.
MARKER = ".drafter.json"
# Folders this project wrote before the marker existed, known by a file only it writes there.
_OURS_BEFORE_MARKER = ("optimizer.safetensors", "drafter_source.json", "registry.json", "validation.failed.json")


def _is_ours(folder: Path) -> bool:
    if (folder / MARKER).is_file() or any((folder / name).is_file() for name in _OURS_BEFORE_MARKER):
        return True
    config = _json_file(folder / "config.json")  # a drafter export from before the marker (best/, steps/...)
    if isinstance(config, dict) and {"speculators_model_type", "drafter"} <= config.keys():
        return True
    manifest = _json_file(folder / "manifest.json")  # a stage manifest (write_manifest), not any manifest.json
    return isinstance(manifest, dict) and {"stage", "provenance"} <= manifest.keys()


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_replaceable(final: str | Path, force: bool = False) -> None:
    """Raise unless `final` is missing, an empty folder, or a folder drafter wrote (or `force`)."""
    final = Path(final)
    if force or not final.exists():
        return
    if not final.is_dir():
        raise OutputDirError(f"{final} exists and is not a folder: refusing to replace it with one")
    if any(final.iterdir()) and not _is_ours(final):
        raise OutputDirError(
            f"{final} is not empty and was not written by drafter (no {MARKER} or stage manifest.json in it): "
            "refusing to replace it and delete what it holds. Choose a new or empty folder, or pass --force "
            "to replace it"
        )


def _backup_of(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_dir(final: str | Path) -> None:
    """Finish a swap that a crash cut short: with no `final`, its backup is put back; else dropped."""
    final = Path(final)
    backup = _backup_of(final)
    if not backup.exists():
        return
    if final.exists():
        shutil.rmtree(backup, ignore_errors=True)  # the new folder made it in; only the cleanup was cut
        return
    os.replace(backup, final)  # killed between the renames: the old folder comes back
    # The new folder that was about to move in: complete (marked) but never published.
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        if (tmp / MARKER).is_file():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`.

    Only a folder drafter wrote (see `check_replaceable`) is replaced unless `force`. The swap
    moves the old folder to a backup, the new one in, then deletes the backup; a crash between
    the renames is undone by the next `atomic_dir` (or `recover_dir`) on the same path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    check_replaceable(final, force)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        atomic_write_json(tmp / MARKER, {"written_by": "drafter"})
        if final.exists():
            backup = _backup_of(final)
            os.replace(final, backup)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_state(cwd: str | Path = ".") -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def provenance() -> dict[str, Any]:
    """Who ran what, where: the command line, git state and package versions."""
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git": git_state(),
        "packages": package_versions(),
        "platform": platform.platform(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def check_accounting(total: int, parts: dict[str, int], what: str = "records") -> None:
    """Raise unless the parts add up exactly to the total (nothing lost, nothing twice)."""
    if sum(parts.values()) != total:
        detail = " + ".join(f"{k} {v}" for k, v in parts.items())
        raise AccountingError(f"{what}: {detail} = {sum(parts.values())}, but {total} were read")


class Timer:
    """Named wall-clock durations for a manifest: `with timer("parse"): ...`."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.durations[name] = round(self.durations.get(name, 0.0) + time.perf_counter() - start, 4)


def write_manifest(
    out_dir: str | Path,
    stage: str,
    *,
    inputs: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    counts: dict[str, Any] | None = None,
    durations: dict[str, float] | None = None,
    outputs: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> "Manifest":
    """Write `out_dir/manifest.json` and return it as the stage's result. `metrics`: the
    stage's headline figures, flat `name -> number` (what MLflow shows and the flow rolls up
    onto its parent run)."""
    from drafter.reports import Manifest, parse

    manifest = {
        "stage": stage,
        "inputs": inputs or {},
        "params": params or {},
        "counts": counts or {},
        "durations_s": durations or {},
        "outputs": outputs or {},
        "metrics": {k: v for k, v in (metrics or {}).items() if _finite(v)},
        **(extra or {}),
        "provenance": provenance(),
    }
    # Manifests travel (MLflow, the registry's lineage, DVC): no URL keeps its credentials.
    manifest = redact_urls(manifest)
    typed = parse(Manifest, manifest, f"the {stage} manifest")
    atomic_write_json(Path(out_dir) / "manifest.json", manifest)
    return typed


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_manifest(out_dir: str | Path) -> "Manifest":
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {out_dir}: has that stage run?")
    from drafter.reports import Manifest, parse

    return parse(Manifest, json.loads(path.read_text()), str(path))
