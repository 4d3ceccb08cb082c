"""Progress of the long stages (regenerate, build-cache, train, calibrate, evaluate): a tqdm bar
in the terminal and, when the stage runs inside a Prefect flow or task run, a progress artifact
that the Prefect UI shows on the run while it works.

The artifact counts what the stage counts (conversations, shards, steps, prompts), resumed work
included, and is updated at most every `every_s` seconds and once at the end: an API call per
training step would cost more than the step. A Prefect API that fails does not stop the stage.
"""

from __future__ import annotations

import logging
import re
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _prefect_run_active() -> bool:
    if "prefect" not in sys.modules:  # no run without it; importing it costs a CLI stage 1.5 s
        return False
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return False
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def artifact_key(desc: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", desc.lower()).strip("-") or "progress"


class StageProgress(tqdm):
    """`tqdm(total=..., initial=..., desc=...)` that also reports to Prefect. Call `update(n)`
    (iterating over it is not counted)."""

    def __init__(self, *args, every_s: float = 5.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # a disabled tqdm (no TTY, other ranks) neither counts nor keeps its labels: keep our own
        self._done = kwargs.get("initial", 0) or 0
        self._total, self._label = kwargs.get("total") or 0, kwargs.get("desc") or "progress"
        self._unit = kwargs.get("unit", "it")
        self._every_s, self._pushed_at, self._artifact = every_s, 0.0, None
        if self._total and _prefect_run_active():
            try:
                from prefect.artifacts import create_progress_artifact

                self._artifact = create_progress_artifact(
                    self._percent(), key=artifact_key(self._label), description=self._describe())
                self._pushed_at = time.monotonic()
            except Exception as exc:  # the stage goes on without it
                log.warning("no Prefect progress artifact for %s: %s", self._label, exc)

    def _percent(self) -> float:
        return round(100.0 * min(self._done, self._total) / self._total, 1) if self._total else 0.0

    def _describe(self) -> str:
        return f"{self._label}: {self._done:,} of {self._total:,} {self._unit}"

    def _push(self, force: bool = False) -> None:
        if self._artifact is None or (not force and time.monotonic() - self._pushed_at < self._every_s):
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, self._percent(), description=self._describe())
            self._pushed_at = time.monotonic()
        except Exception as exc:
            log.warning("Prefect progress artifact for %s not updated: %s", self._label, exc)
            self._artifact = None

    def update(self, n: float = 1) -> bool | None:
        self._done += n
        shown = super().update(n)
        self._push()
        return shown

    def close(self) -> None:
        if getattr(self, "_artifact", None) is not None:
            self._push(force=True)
            self._artifact = None
        super().close()
