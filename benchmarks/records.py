"""The JSON record a stand-alone benchmark script writes: settings, rows, summary, the machine and the date."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any


def write_record(
    path: Path, benchmark: str, settings: dict[str, Any], rows: list[dict[str, Any]], summary: Any, **extra: Any
) -> None:
    """Write one benchmark's record to ``path`` (its folder made if needed); ``extra`` adds top-level fields."""
    record = {
        "benchmark": benchmark,
        "settings": settings,
        "rows": rows,
        "summary": summary,
        **extra,
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "date": datetime.date.today().isoformat(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
