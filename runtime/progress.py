"""Progress of long library calls: one callback type, ``progress(phase, done, total)``.

Library code that runs for more than a few seconds (checks, reports, evaluations) takes an optional callback
and calls it with a short phase name and increasing counts, ``done`` from 0 (started) to ``total`` (finished).
It never prints; the caller decides how to show it (the CLI draws one updating line on a terminal).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
