"""The one progress display of the CLI: a rich bar per task, fed by the library's ``Step`` reports."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from fgplugin.progress import Step


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- items/s" if speed is None else f"{speed:.1f} items/s", style="progress.data.speed")


class ProgressDisplay:
    """``with ProgressDisplay(console) as show: library_call(..., on_progress=show)``.

    ``enabled=False`` shows nothing (``--quiet``, JSON output); ``transient`` clears the bars at the end;
    ``rate`` adds an items/s column (index runs). The display starts at the first step, not on entry:
    work that forks worker processes (``synth.generate``) does so before its first step, and a fork
    must not copy a running refresh thread (it may hold the console's lock, and the workers would hang)."""

    def __init__(self, console: Console | None = None, *, enabled: bool = True, transient: bool = False,
                 rate: bool = False):
        columns: list[Any] = [TextColumn("[progress.description]{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TaskProgressColumn()]
        if rate:
            columns.append(_RateColumn())
        columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        self.progress = Progress(*columns, console=console or Console(stderr=True), transient=transient,
                                 disable=not enabled)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()  # does nothing if never started

    def __call__(self, step: Step) -> None:
        self.progress.start()  # does nothing once started
        task = self._tasks.get(step.task)
        if task is None:
            task = self._tasks[step.task] = self.progress.add_task(step.task, total=step.total, info=step.info)
        self.progress.update(task, completed=step.done, total=step.total, info=step.info)
