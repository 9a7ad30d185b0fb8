"""What a read trace is: its requests (``TraceRequest``) and the ``Trace`` that holds them, whatever the format."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TraceRequest:
    """One recorded request: when it arrived (s since the trace's first), its lengths, its prompt's blocks."""

    arrival_s: float
    prompt_toks: int
    gen_toks: int
    block_ids: tuple[int, ...] = ()  # the prompt's blocks (trace block size), equal ids = equal tokens
    session: str | None = None  # a conversation / agent session the request is a turn of
    elapsed_s: float | None = None  # recorded submission → last token (BurstGPT), for think times


@dataclass
class Trace:
    """A read trace: its requests in arrival order, the format, its block size and what reading it changed."""

    requests: list[TraceRequest]
    format: str
    path: str
    block_toks: int = 0  # tokens per block id (0: the trace names no blocks)
    failed: int = 0  # requests the file records as failed, dropped
    notes: list[str] = field(default_factory=list)  # each cut or drop, in words (reported with the trace)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def sessions(self) -> int:
        return len({r.session for r in self.requests if r.session is not None})
