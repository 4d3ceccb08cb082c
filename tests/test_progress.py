"""Long stages report progress to the Prefect UI (a progress artifact on the run) as well as the terminal."""

from __future__ import annotations

from drafter.progress import StageProgress, artifact_key


def test_artifact_key_is_what_prefect_accepts():
    assert artifact_key("train dspark") == "train-dspark"
    assert artifact_key("cache Train/2") == "cache-train-2"


def test_without_a_prefect_run_it_is_a_plain_bar():
    bar = StageProgress(total=4, desc="x", disable=True)
    bar.update(3)
    assert bar._artifact is None and bar._percent() == 75.0  # counted although tqdm is disabled
    bar.close()


def test_inside_a_flow_run_the_ui_gets_a_progress_artifact_that_ends_at_100(tmp_path, monkeypatch):
    """A real flow run on the temporary local API; the artifact read back through the client.
    The bar is disabled (no TTY in a worker), resumes at 2 of 10 and is updated once per item."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    seen = {}

    @flow
    def stage():
        bar = StageProgress(total=10, initial=2, desc="regenerate train", unit="conv", disable=True, every_s=0.0)
        seen["first"] = bar._percent()
        for _ in range(8):
            bar.update(1)
        bar.close()

    stage()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["regenerate-train"])))
    assert seen["first"] == 20.0
    assert artifacts and artifacts[0].type == "progress" and float(artifacts[0].data) == 100.0
    assert "10 of 10 conv" in artifacts[0].description
