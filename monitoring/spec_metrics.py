"""Speculative-decoding counters with exactly vLLM's Prometheus names and labels.

Our own engine (`drafter generate`) updates these so that `drafter monitor` reads it the
same way it reads a vLLM server (names from vLLM's `vllm/v1/spec_decode/metrics.py`;
prometheus-client appends `_total` to counters when exposing them):

    vllm:spec_decode_num_drafts_total{model_name, engine}
    vllm:spec_decode_num_draft_tokens_total{model_name, engine}
    vllm:spec_decode_num_accepted_tokens_total{model_name, engine}
    vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name, engine, position}  (0-based)

Usage in an engine:

    metrics = SpecDecodeMetrics(num_spec_tokens=7, model_name="SmolLM2-135M-Instruct")
    metrics.serve(port=8001)          # http://127.0.0.1:8001/metrics
    ...
    metrics.observe_round(num_draft=7, num_accepted=3)   # after each verification
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server

DRAFTS = "vllm:spec_decode_num_drafts"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
LABELS = ["model_name", "engine"]


class SpecDecodeMetrics:
    def __init__(
        self,
        num_spec_tokens: int,
        model_name: str = "drafter",
        engine: str = "0",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if num_spec_tokens < 1:
            raise ValueError("num_spec_tokens must be at least 1")
        self.num_spec_tokens = num_spec_tokens
        self.registry = registry if registry is not None else CollectorRegistry()
        values = [model_name, str(engine)]
        self.drafts = Counter(DRAFTS, "Number of spec decoding drafts.", LABELS, registry=self.registry).labels(*values)
        self.draft_tokens = Counter(
            DRAFT_TOKENS, "Number of draft tokens.", LABELS, registry=self.registry).labels(*values)
        self.accepted = Counter(
            ACCEPTED, "Number of accepted tokens.", LABELS, registry=self.registry).labels(*values)
        per_pos = Counter(ACCEPTED_PER_POS, "Accepted tokens per draft position.", LABELS + ["position"],
                          registry=self.registry)
        self.accepted_per_pos = [per_pos.labels(*values, str(i)) for i in range(num_spec_tokens)]

    def observe_round(self, num_draft: int, num_accepted: int | Sequence[int]) -> None:
        """One verification: `num_draft` tokens proposed, the first `num_accepted` accepted.

        `num_accepted` may also be the per-position 0/1 outcome of the round; acceptance
        stops at the first rejection, so it must be a prefix of ones.
        """
        if isinstance(num_accepted, int):
            accepted = num_accepted
        else:
            flags = [int(f) for f in num_accepted]
            accepted = sum(flags)
            if len(flags) != num_draft or flags != [1] * accepted + [0] * (num_draft - accepted):
                raise ValueError(f"per-position outcomes must be {num_draft} flags, accepted ones first: {flags}")
        if not 1 <= num_draft <= self.num_spec_tokens or not 0 <= accepted <= num_draft:
            raise ValueError(f"round with {num_draft} drafted and {accepted} accepted "
                             f"(at most {self.num_spec_tokens} per round)")
        self.drafts.inc()
        self.draft_tokens.inc(num_draft)
        self.accepted.inc(accepted)
        for position in range(accepted):
            self.accepted_per_pos[position].inc()

    def exposition(self) -> str:
        """The counters in the Prometheus text format (what /metrics returns)."""
        return generate_latest(self.registry).decode()

    def write(self, path) -> None:
        """Write the exposition to a file `drafter monitor --metrics FILE` can read."""
        from drafter.manifest import atomic_write_text

        atomic_write_text(path, self.exposition())

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Expose `/metrics` over HTTP in a background thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
