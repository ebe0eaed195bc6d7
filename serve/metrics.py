"""Counters, gauges and a latency histogram, written in the Prometheus text exposition format by hand."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


class Metrics:
    """What the HTTP layer counts; ``render`` adds the service's queue gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.images = 0
        self.cached: dict[int, int] = defaultdict(int)  # requests that ran with step caching, by interval
        self.buckets: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)

    def observe(
        self, endpoint: str, status: int, seconds: float, images: int = 0, error: str = "", cache_interval: int = 1
    ) -> None:
        """Count one answered request (``cache_interval`` > 1: it ran with step caching)."""
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.images += images
            if cache_interval > 1:
                self.cached[cache_interval] += 1
            if error:
                self.errors[error] += 1
            counts = self.buckets.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[endpoint] += seconds
            self.latency_count[endpoint] += 1

    def render(self, queued: int, running: int, capacity: int) -> str:
        lines = [
            "# HELP sdtrt_queue_length Requests waiting in the queue.",
            "# TYPE sdtrt_queue_length gauge",
            f"sdtrt_queue_length {queued}",
            "# HELP sdtrt_queue_capacity Most requests the queue holds.",
            "# TYPE sdtrt_queue_capacity gauge",
            f"sdtrt_queue_capacity {capacity}",
            "# HELP sdtrt_running Requests running on the pipeline.",
            "# TYPE sdtrt_running gauge",
            f"sdtrt_running {running}",
        ]
        with self._lock:
            lines += ["# HELP sdtrt_requests_total HTTP requests answered.", "# TYPE sdtrt_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f"sdtrt_requests_total{_labels(endpoint=endpoint, status=str(status))} {n}")
            lines += ["# HELP sdtrt_images_total Images generated.", "# TYPE sdtrt_images_total counter"]
            lines.append(f"sdtrt_images_total {self.images}")
            lines += [
                "# HELP sdtrt_cached_requests_total Requests that ran with step caching, by cache interval.",
                "# TYPE sdtrt_cached_requests_total counter",
            ]
            for interval, n in sorted(self.cached.items()):
                lines.append(f"sdtrt_cached_requests_total{_labels(interval=str(interval))} {n}")
            lines += ["# HELP sdtrt_errors_total Requests that failed, by kind.", "# TYPE sdtrt_errors_total counter"]
            for kind, n in sorted(self.errors.items()):
                lines.append(f"sdtrt_errors_total{_labels(kind=kind)} {n}")
            lines += [
                "# HELP sdtrt_request_seconds Time to answer a generation request.",
                "# TYPE sdtrt_request_seconds histogram",
            ]
            for endpoint, counts in sorted(self.buckets.items()):
                for bound, n in zip(LATENCY_BUCKETS, counts, strict=True):
                    lines.append(f"sdtrt_request_seconds_bucket{_labels(endpoint=endpoint, le=f'{bound:g}')} {n}")
                total = self.latency_count[endpoint]
                lines.append(f"sdtrt_request_seconds_bucket{_labels(endpoint=endpoint, le='+Inf')} {total}")
                lines.append(f"sdtrt_request_seconds_sum{_labels(endpoint=endpoint)} {self.latency_sum[endpoint]:.6f}")
                lines.append(f"sdtrt_request_seconds_count{_labels(endpoint=endpoint)} {total}")
        return "\n".join(lines) + "\n"
