"""What the user sees while a build runs: one line per finished step and, on a terminal,
a live bar for the step in progress (its layers). Off a terminal only the lines print."""

from __future__ import annotations

import sys
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Display:
    def __init__(self, total_steps: int, stream=None):
        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.live = self.console.is_terminal
        self.progress = None
        self.tasks: dict[str, int] = {}
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[what]}", markup=False),
                console=self.console,
                transient=True,
            )
            self.steps = self.progress.add_task("steps", total=total_steps, what="")

    def __enter__(self) -> "Display":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def step_progress(self, label: str) -> Callable[[int, int, str], None]:
        """A progress(done, total, what) callback drawing a bar for one running step."""
        if not self.progress:
            return lambda done, total, what="": None
        task = self.progress.add_task(f"  {label}", total=None, what="")
        self.tasks[label] = task

        def progress(done: int, total: int, what: str = "") -> None:
            self.progress.update(task, completed=done, total=total, what=what)

        return progress

    def started(self, label: str) -> None:
        if self.progress:
            self.progress.update(self.steps, what=label)

    def finished(self, label: str, status: str, seconds: float, key: str, error: str = "") -> None:
        style = {"ran": "green", "cached": "cyan", "failed": "red", "skipped": "yellow"}.get(status, "")
        detail = f"{seconds:7.1f}s" if status == "ran" else " " * 8
        line = f"[{style}]{status:>7}[/] {detail}  {escape(f'{label:<20}')} {key[:12]}"
        self.console.print(line + (f"  {escape(error)}" if error else ""))
        if self.progress:
            self.progress.advance(self.steps)
            if label in self.tasks:
                self.progress.remove_task(self.tasks.pop(label))
