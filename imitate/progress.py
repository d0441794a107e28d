"""The one progress bar: rich, on stderr, a no-op when disabled (--no-progress, other ranks) or with nothing to do.

    with Bar("collect", total, fields={"rate": 0.0}, columns=["{rate:.1f} req/s"]) as bar:
        bar.update(advance=1, rate=12.5)
"""

from __future__ import annotations

import re
from typing import Any


class Bar:
    """label, bar, done/total, the `columns` (format strings over `fields`), time left. Extra text columns read the
    bar's fields: "{rate:.1f} req/s" shows the field `rate`. `completed` starts a resumed bar part way."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, completed: int = 0,
                 fields: dict[str, Any] | None = None, columns: list[str] = (), elapsed: bool = False):
        self.progress = None
        if not enabled or total <= 0:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        extra = [TextColumn(re.sub(r"\{(\w+)", r"{task.fields[\1]", c)) for c in columns]
        self.progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), *extra,
            *([TimeElapsedColumn()] if elapsed else []), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task(label, total=total, completed=completed, **(fields or {}))
        self.progress.start()

    def update(self, advance: int = 0, completed: int | None = None, **fields: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=advance or None, completed=completed, **fields)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
