"""A progress line on stderr for long library calls: redrawn in place on a terminal, absent otherwise.

Quiet when stderr is not a terminal (logs, CI, pipes get no control characters) or with ``sdtrt -q``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import click

from sdtrt.runtime.progress import Progress


def progress_line(stream: TextIO | None = None, quiet: bool | None = None) -> Progress | None:
    """A ``Progress`` that draws ``phase done/total`` on one line, ending each phase's line with its time.

    None (nothing drawn) when ``stream`` (default stderr) is not a terminal or the command runs with ``-q``.
    """
    out = stream or sys.stderr
    if quiet is None:
        context = click.get_current_context(silent=True)
        quiet = bool(context and context.find_root().params.get("quiet"))
    if quiet or not out.isatty():
        return None
    started: dict[str, float] = {}

    def draw(phase: str, done: int, total: int) -> None:
        start = started.setdefault(phase, time.perf_counter())
        text = f"{phase} {done}/{total}"
        if done >= total:
            text += f" ({time.perf_counter() - start:.1f} s)\n"
        out.write("\r\x1b[K" + text)  # back to the line's start and clear it: one line per phase
        out.flush()

    return draw
