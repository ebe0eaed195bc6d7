"""Shape profiles: the range of batch sizes and image sizes an artifact or engine accepts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sdtrt.runtime.errors import ShapeError


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max of batch and image size (pixels). ``opt`` is what engines are tuned for."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_height: int = 512
    opt_height: int = 512
    max_height: int = 512
    min_width: int = 512
    opt_width: int = 512
    max_width: int = 512
    max_prompt_windows: int = 1

    def __post_init__(self) -> None:
        for dim in ("batch", "height", "width"):
            lo, opt, hi = (getattr(self, f"{w}_{dim}") for w in ("min", "opt", "max"))
            if not (isinstance(lo, int) and isinstance(opt, int) and isinstance(hi, int)):
                raise ShapeError(f"{dim} range must be integers, got min={lo!r} opt={opt!r} max={hi!r}")
            if lo < 1 or not lo <= opt <= hi:
                raise ShapeError(f"{dim} range must satisfy 1 <= min <= opt <= max, got min={lo} opt={opt} max={hi}")
            if dim != "batch":
                for which, value in (("min", lo), ("opt", opt), ("max", hi)):
                    if value % 8:
                        raise ShapeError(
                            f"{which} {dim} must be a multiple of 8 pixels, got {value}; "
                            f"use {max(8, -(-value // 8) * 8)}"
                        )
        if self.max_prompt_windows < 1:
            raise ShapeError(f"max_prompt_windows must be >= 1, got {self.max_prompt_windows}")

    @classmethod
    def static(cls, height: int, width: int, batch: int = 1) -> ShapeProfile:
        return cls(batch, batch, batch, height, height, height, width, width, width)

    @classmethod
    def square(cls, min_size: int, opt_size: int, max_size: int, max_batch: int = 4) -> ShapeProfile:
        return cls(1, 1, max_batch, min_size, opt_size, max_size, min_size, opt_size, max_size)

    @property
    def id(self) -> str:
        """Stable, readable id, used in file names: equal profiles always give the same id."""

        def part(tag: str, lo: int, opt: int, hi: int) -> str:
            return f"{tag}{lo}" if lo == opt == hi else f"{tag}{lo}-{opt}-{hi}"

        parts = [
            part("b", self.min_batch, self.opt_batch, self.max_batch),
            part("h", self.min_height, self.opt_height, self.max_height),
            part("w", self.min_width, self.opt_width, self.max_width),
        ]
        if self.max_prompt_windows > 1:
            parts.append(f"t{self.max_prompt_windows}")
        return "_".join(parts)

    def contains(self, height: int, width: int, batch: int = 1) -> bool:
        return (
            self.min_height <= height <= self.max_height
            and self.min_width <= width <= self.max_width
            and self.min_batch <= batch <= self.max_batch
        )

    def check(self, height: int, width: int, batch: int = 1) -> None:
        """Raise ShapeError naming the allowed range unless the request fits."""
        if not self.contains(height, width, batch):
            raise ShapeError(
                f"request of {batch} image(s) at {width}x{height} is outside this artifact's profile: "
                f"width {self.min_width}..{self.max_width}, height {self.min_height}..{self.max_height}, "
                f"batch {self.min_batch}..{self.max_batch}. Re-export (or rebuild) with a wider range, "
                f"e.g. --min-size/--max-size/--max-batch"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeProfile:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ShapeError(f"unknown profile fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**data)
