"""Stored artifacts: credentials kept out of records, output folders replaced only when they are
ours and never lost to a crash, and damaged or foreign inputs refused with a clear error."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from drafter.errors import DrafterError
from drafter.manifest import MARKER, atomic_dir, read_manifest, redact_url, redact_urls, write_manifest
from tests.conftest import ROOT


# ----- credentials in URLs ------------------------------------------------------------------
@pytest.mark.parametrize("url, want", [
    ("https://bob:hunter2@api.example.com:8443/v1", "https://REDACTED@api.example.com:8443/v1"),
    ("https://TOKEN123@github.com/org/repo.git", "https://REDACTED@github.com/org/repo.git"),
    ("https://h/v1?api_key=abc&api-version=2024-06-01", "https://h/v1?api_key=REDACTED&api-version=2024-06-01"),
    ("https://b.s3.amazonaws.com/x?X-Amz-Signature=ff&X-Amz-Credential=AK%2F1&x=1",
     "https://b.s3.amazonaws.com/x?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&x=1"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),  # nothing secret: unchanged
    ("not a url", "not a url"),
])
def test_redact_url(url, want):
    assert redact_url(url) == want


def test_redact_urls_reaches_urls_inside_text_and_structures():
    obj = {"cmd": "drafter regenerate -s regenerate.base_url=https://bob:hunter2@h/v1 --out x",
           "nested": [{"uri": "sqlite:///mlflow.db"}, "postgresql://u:pw@db:5432/mlflow"], "n": 3}
    out = json.dumps(redact_urls(obj))
    assert "hunter2" not in out and ":pw@" not in out
    assert redact_urls(obj)["nested"][0] == {"uri": "sqlite:///mlflow.db"} and redact_urls(obj)["n"] == 3


def test_write_manifest_records_no_url_credentials(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["drafter", "regenerate", "-s",
                                      "regenerate.base_url=https://bob:hunter2@h/v1?token=t0k3n"])
    write_manifest(tmp_path, "regenerate", params={"base_url": "https://bob:hunter2@h/v1"},
                   extra={"server": {"url": "https://h/v1?access_token=t0k3n"}})
    text = (tmp_path / "manifest.json").read_text()
    assert "hunter2" not in text and "t0k3n" not in text
    manifest = read_manifest(tmp_path)
    assert manifest.params["base_url"] == "https://REDACTED@h/v1"
    assert "REDACTED@h/v1" in manifest.provenance["command"]


# ----- atomic_dir: only our own folders are replaced ------------------------------------------
def publish(path, text, **kw):
    with atomic_dir(path, **kw) as tmp:
        (tmp / "out.txt").write_text(text)


def test_a_folder_that_is_not_ours_is_refused(tmp_path):
    data = tmp_path / "data"  # `--out data`: the parent of every stage's output
    (data / "ingested").mkdir(parents=True)
    (data / "ingested" / "manifest.json").write_text(json.dumps({"stage": "ingest", "provenance": {}}))
    (data / "notes.txt").write_text("mine")
    with pytest.raises(DrafterError, match="--force") as err:
        publish(data, "new")
    assert str(data) in str(err.value)
    assert (data / "notes.txt").read_text() == "mine" and (data / "ingested" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(DrafterError, match="not a folder"):
        publish(tmp_path / "file", "new")
    publish(data, "forced", force=True)
    assert (data / "out.txt").read_text() == "forced" and not (data / "notes.txt").exists()


def test_our_folders_are_replaced(tmp_path):
    publish(tmp_path / "a", "one")
    assert (tmp_path / "a" / MARKER).is_file()
    publish(tmp_path / "a", "two")  # written by atomic_dir before: marked
    assert (tmp_path / "a" / "out.txt").read_text() == "two"
    (tmp_path / "empty").mkdir()
    publish(tmp_path / "empty", "x")  # an empty folder holds nothing to lose
    # Written before the marker existed: a stage output (its manifest) is ours, a foreign manifest is not.
    (tmp_path / "stage").mkdir()
    write_manifest(tmp_path / "stage", "ingest")
    publish(tmp_path / "stage", "x")
    # A drafter export from before the marker (a training run's best/ that a resumed run replaces).
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.json").write_text(json.dumps({"speculators_model_type": "dspark", "drafter": {}}))
    publish(tmp_path / "best", "x")
    (tmp_path / "hf").mkdir()  # someone else's model folder is not ours
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DrafterError, match="not written by drafter"):
        publish(tmp_path / "hf", "x")
    (tmp_path / "webapp").mkdir()
    (tmp_path / "webapp" / "manifest.json").write_text(json.dumps({"name": "my app", "icons": []}))
    with pytest.raises(DrafterError, match="not written by drafter"):
        publish(tmp_path / "webapp", "x")


# ----- atomic_dir: a kill between the two renames loses nothing --------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from drafter import manifest

    final, after = Path(sys.argv[1]), int(sys.argv[2])
    real, calls = os.replace, []

    def replace(src, dst):  # counts the swap's renames only (not the files written inside)
        real(src, dst)
        if Path(dst).parent == final.parent:
            calls.append(dst)
            if len(calls) == after:
                os.kill(os.getpid(), signal.SIGKILL)

    manifest.os.replace = replace
    with manifest.atomic_dir(final) as tmp:
        (tmp / "out.txt").write_text("new")
""")


@pytest.mark.parametrize("after, want", [(1, "old"), (2, "new")])
def test_a_kill_between_the_renames_is_recovered(tmp_path, after, want):
    final = tmp_path / "out"
    publish(final, "old")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(final), str(after)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if after == 1:
        assert not final.exists()  # the window: the old folder moved aside, the new one not yet in
    # The next writer (here one that fails) first puts things right.
    with pytest.raises(RuntimeError):
        with atomic_dir(final):
            raise RuntimeError("the next run fails")
    assert (final / "out.txt").read_text() == want
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == []  # no backup, no temporary
    publish(final, "later")
    assert (final / "out.txt").read_text() == "later"


# ----- calibrate refuses a cache made for another target --------------------------------------
def test_calibrate_refuses_a_cache_for_another_target(tiny_config, tiny_target, tmp_path):
    from drafter.cache import CacheMismatchError, build_cache
    from drafter.calibrate import calibrate
    from tests.drafters import BigramDrafter
    from tests.regen_data import make_rows, write_regenerated

    cfg = tiny_config.model_copy(update={"cache": tiny_config.cache.model_copy(update={"root": tmp_path / "caches"})})
    regenerated = write_regenerated(tmp_path / "regenerated", {"train": make_rows(2), "holdout": make_rows(2, start=50)})
    build_cache(cfg, regenerated, tmp_path / "cache", target=tiny_target)
    drafter = BigramDrafter.random(tiny_target.vocab_size, seed=0, confidences=True).export(tmp_path / "drafter")
    target = cfg.target.model_copy(update={"tiny": cfg.target.tiny.model_copy(update={"seed": 1})})
    other = cfg.model_copy(update={"target": target})  # same shape and tokenizer, other weights
    with pytest.raises(CacheMismatchError, match="rebuild the cache"):
        calibrate(other, drafter, tmp_path / "cache", tmp_path / "cal")
    assert not (tmp_path / "cal").exists()


# ----- damaged weights and cache files are the project's own errors ---------------------------
def test_damaged_drafter_weights_are_a_clear_error(tiny_target, tmp_path):
    from drafter.decoding import load_drafter
    from drafter.models import speculators_format as fmt

    folder = tmp_path / "drafter"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"speculators_model_type": "dspark"}))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    for load in (lambda: fmt.read(folder), lambda: load_drafter(folder, tiny_target)):
        with pytest.raises(fmt.DrafterFormatError, match="model.safetensors") as err:
            load()
        assert str(folder / "model.safetensors") in str(err.value) and "damaged" in str(err.value)


def test_damaged_cache_pointer_and_index_are_clear(tmp_path):
    from drafter.cache import CacheCorruptError, CacheReader, open_split

    (tmp_path / "holdout.json").write_text('{"path": "ca')  # cut off mid-write
    with pytest.raises(CacheCorruptError, match="holdout.json"):
        open_split(tmp_path, "holdout")
    (tmp_path / "train.json").write_text(json.dumps({"split": "train"}))
    with pytest.raises(CacheCorruptError, match="train.json"):
        open_split(tmp_path, "train")
    (tmp_path / "key").mkdir()
    (tmp_path / "key" / "index.json").write_text(json.dumps({"format": 1, "shards": []}))
    with pytest.raises(CacheCorruptError, match="index.json"):
        CacheReader(tmp_path / "key")
