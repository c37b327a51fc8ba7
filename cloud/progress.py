"""Progress bars for long cloud work (rich), silent when not wanted."""

from __future__ import annotations

from contextlib import contextmanager


class _Bar:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def advance(self, n: int = 1, **fields) -> None:
        if self._p is not None:
            desc = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            self._p.update(self._t, advance=n, info=desc)


@contextmanager
def progress_bar(label: str, total: int, enabled: bool = True):
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=total, info="")
        yield _Bar(progress, task)
