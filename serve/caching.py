"""Step caching on the server: the server's default (``sdtrt serve --cache-interval N --cache-schedule S``) and
a request's own choice in its A1111 payload.

A request chooses with sdtrt-named keys, in ``override_settings`` (where A1111 clients such as ``webuiapi`` put
settings; A1111 itself skips keys it does not know) or as top-level fields of the payload:

    {"prompt": "...", "override_settings": {"sdtrt_cache_interval": 3, "sdtrt_cache_schedule": "quadratic"}}
    {"prompt": "...", "sdtrt_cache_interval": 3}

A key left out takes the server's default; ``"sdtrt_cache_interval": 1`` runs every step in full even when the
server caches by default. A key that starts with ``sdtrt_`` but is not one of these is refused (a misspelling
would otherwise run uncached without a word), as is the same key given twice with different values.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sdtrt.runtime.cache_plan import CACHE_SCHEDULES, check_cache_args, check_cache_supported
from sdtrt.runtime.errors import ArtifactError
from sdtrt.serve.errors import RequestError

INTERVAL_KEY = "sdtrt_cache_interval"
SCHEDULE_KEY = "sdtrt_cache_schedule"
CACHE_KEYS = (INTERVAL_KEY, SCHEDULE_KEY)
PREFIX = "sdtrt_"


@dataclass(frozen=True)
class CacheDefaults:
    """The server's step caching for requests that do not choose: a full UNet step every ``interval`` steps."""

    interval: int = 1
    schedule: str = "uniform"

    def __post_init__(self) -> None:
        check_cache_args(self.interval, self.schedule)

    def check_artifact(self, components: Collection[str], where: str) -> None:
        """``ArtifactError`` (before anything loads) when ``interval`` > 1 and ``components`` lack the shallow UNet."""
        check_cache_supported(self.interval, components, where)

    def resolve(self, interval: int | None, schedule: str | None) -> tuple[int, str]:
        """A request's (interval, schedule), the ones it left out (None) set to this default."""
        return (self.interval if interval is None else interval, self.schedule if schedule is None else schedule)


def parse_cache_fields(payload: dict[str, Any]) -> tuple[int | None, str | None]:
    """(interval, schedule) a payload asks for (None: the server's default); ``RequestError`` naming the field."""
    overrides = payload.get("override_settings")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise RequestError(f"override_settings must be a JSON object, got {type(overrides).__name__}")
    places = (("override_settings.", overrides), ("", payload))
    for where, fields in places:
        for key in fields:
            if isinstance(key, str) and key.startswith(PREFIX) and key not in CACHE_KEYS:
                raise RequestError(
                    f"unknown sdtrt field {where}{key}; the sdtrt fields are {', '.join(CACHE_KEYS)} "
                    "(check the spelling)"
                )
    interval = _one_value(places, INTERVAL_KEY)
    schedule = _one_value(places, SCHEDULE_KEY)
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise RequestError(
            f"{INTERVAL_KEY} must be an integer >= 1 (1 runs every step in full, no caching), "
            f"got {json.dumps(interval)[:60]}"
        )
    if schedule is not None and schedule not in CACHE_SCHEDULES:
        raise RequestError(
            f"{SCHEDULE_KEY} must be one of {', '.join(repr(s) for s in CACHE_SCHEDULES)}, "
            f"got {json.dumps(schedule)[:60]}"
        )
    return interval, schedule


def _one_value(places: tuple[tuple[str, dict[str, Any]], ...], key: str) -> Any:
    """The value of ``key`` where given (None if nowhere); ``RequestError`` if two places disagree."""
    found = [(where, fields[key]) for where, fields in places if fields.get(key) is not None]
    if len({json.dumps(value) for _, value in found}) > 1:
        given = " and ".join(f"{where}{key}={json.dumps(value)[:30]}" for where, value in found)
        raise RequestError(f"{key} is given twice with different values ({given}); give it once")
    return found[0][1] if found else None


def check_cache_request(interval: int, components: Collection[str]) -> None:
    """``RequestError`` naming the field when a request's ``interval`` (default applied) asks for caching of an
    artifact without the shallow UNet (``components``: the open engines)."""
    try:
        check_cache_supported(interval, components)
    except ArtifactError:
        raise RequestError(
            f"{INTERVAL_KEY} {interval} needs the shallow UNet (unet_shallow), which this model's artifact lacks; "
            f"send {INTERVAL_KEY} 1 (or leave it out), or re-export the model with `sdtrt export --step-cache`"
        ) from None


def cache_info(interval: int, schedule: str) -> dict[str, Any]:
    """The keys ``info`` and ``parameters`` record for a cached generation (none when every step ran in full)."""
    return {INTERVAL_KEY: interval, SCHEDULE_KEY: schedule} if interval > 1 else {}


__all__ = [
    "CACHE_KEYS",
    "CacheDefaults",
    "cache_info",
    "check_cache_request",
    "parse_cache_fields",
]
