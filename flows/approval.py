"""Human approval before rollout, as a Prefect subflow.

With a Prefect server (`PREFECT_API_URL` set) the subflow pauses with
`pause_flow_run(wait_for_input=ApprovalInput)`: the Prefect UI shows the gate report and a
Resume form (approve yes/no, who, why). The decision is recorded on the model version and,
when approved, `production` moves. No answer within `registry.approval_timeout_s` means
not promoted: the version keeps awaiting a decision from the CLI (`drafter approve`).

Without a server (the temporary local API cannot be reached by anyone else) and for
scheduled runs, the subflow does not wait: the version awaits `drafter approve|reject`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from drafter import registry


class ApprovalInput(RunInput):
    """The Resume form the Prefect UI shows to the approver."""

    approve: bool = Field(description="Promote this version to production?")
    approver: str = Field(min_length=1, description="Who decides (recorded in the registry)")
    reason: str = Field(min_length=1, description="Why (recorded in the registry)")


def prefect_server() -> str | None:
    """The Prefect API URL when a server is configured; None on the temporary local API."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def cli_hint(name: str, version: str) -> str:
    return (
        f"drafter approve {name} {version} --by WHO --reason '...'\n"
        f"drafter reject {name} {version} --by WHO --reason '...'"
    )


@flow(name="drafter-approval", log_prints=False)
def approval_flow(
    name: str,
    version: str,
    gate_markdown: str,
    timeout_s: int = 3600,
    poll_s: int = 10,
    wait: bool | None = None,
) -> dict[str, Any]:
    """Wait for a decision in the Prefect UI (or leave it to the CLI) and act on it."""
    log = get_run_logger()
    server = prefect_server()
    if wait and not server:
        log.warning("no Prefect server: nobody could resume a paused run, so the decision goes to the CLI")
    wait = bool(server) and wait is not False
    request = (
        f"# Approve `{name}` version {version}?\n\n{gate_markdown}\n\n"
        + (f"Decide in the Resume form of this flow run within {timeout_s} s, or from a shell:\n\n"
           if wait else "Decide from a shell:\n\n")
        + f"```bash\n{cli_hint(name, version)}\n```\n"
    )
    create_markdown_artifact(request, key="drafter-approval-request", description=f"{name} v{version}")
    if not wait:
        log.warning("%s version %s awaits approval:\n%s", name, version, cli_hint(name, version))
        return {"decision": "awaiting", "name": name, "version": version}
    form = ApprovalInput.with_initial_data(description=request, approve=False)
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=poll_s)
    except FlowPauseTimeout:
        registry.record_timeout(name, version, timeout_s)
        log.warning("no decision within %s s: %s version %s is not promoted", timeout_s, name, version)
        return {"decision": "timeout", "name": name, "version": version}
    if answer.approve:
        result = registry.approve(name, version, by=answer.approver, reason=answer.reason, via="prefect-ui")
        log.info("approved by %s: %s version %s is in production", answer.approver, name, version)
        return {"decision": "approved", "by": answer.approver, **result, "version": version}
    registry.reject(name, version, by=answer.approver, reason=answer.reason, via="prefect-ui")
    log.info("rejected by %s: %s", answer.approver, answer.reason)
    return {"decision": "rejected", "by": answer.approver, "name": name, "version": version}
