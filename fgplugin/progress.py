"""How long work reports progress: the library calls ``on_progress(Step(...))``; what is shown (a rich
bar in the CLI, a log line, nothing) is the caller's choice. The library never draws.

    def train(..., on_progress: OnProgress | None = None): ...
        report(on_progress, "stage 1", done=step, total=steps, info=f"loss {loss:.3f}")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Step:
    """One report: ``done`` of ``total`` units of ``task`` (total None: unknown); ``info`` a short
    free-text status (loss, rate, the current phase). A task is identified by its name; a new name
    starts a new bar."""

    task: str
    done: int
    total: Optional[int] = None
    info: str = ""


OnProgress = Callable[[Step], None]


def report(on_progress: OnProgress | None, task: str, done: int, total: int | None = None, info: str = "") -> None:
    """Call ``on_progress`` if there is one (so library code needs no ``if`` at each report)."""
    if on_progress is not None:
        on_progress(Step(task, done, total, info))
