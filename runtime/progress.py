"""Progress and cancellation of long library calls.

``Progress``: library code that runs for more than a few seconds (checks, reports, evaluations) takes an optional
callback and calls it with a short phase name and increasing counts, ``done`` from 0 (started) to ``total``
(finished). It never prints; the caller decides how to show it (the CLI draws one updating line on a terminal).

``Cancel``: a call that can stop early (the pipeline's denoising loop) takes any object with ``is_set()``, such as
``threading.Event``, and reads it only between units of work (steps), never inside one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

Progress = Callable[[str, int, int], None]


@runtime_checkable
class Cancel(Protocol):
    """Asks a running call to stop at its next check (``threading.Event`` is one)."""

    def is_set(self) -> bool: ...
