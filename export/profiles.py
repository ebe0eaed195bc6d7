"""Default and user-given shape profiles for export."""

from __future__ import annotations

from sdtrt.runtime.models.bundle import ModelBundle
from sdtrt.runtime.profile import ShapeProfile

Size = tuple[int, int]  # (height, width)


def default_profile(bundle: ModelBundle) -> ShapeProfile:
    """tiny and shapes: 64..256 px (opt 128); real models: 256..1024 px (opt 512); batch 1..4."""
    if bundle.source.get("kind") == "preset" and bundle.source.get("name") in ("tiny", "shapes"):
        return ShapeProfile.square(64, 128, 256)
    return ShapeProfile.square(256, 512, 1024)


def make_profile(
    base: ShapeProfile,
    min_size: Size | None,
    opt_size: Size | None,
    max_size: Size | None,
    max_batch: int,
    max_prompt_windows: int = 1,
) -> ShapeProfile:
    """Override ``base`` with the sizes given; an omitted opt falls between min and max."""
    lo = min_size or (base.min_height, base.min_width)
    hi = max_size or (base.max_height, base.max_width)
    if opt_size is None:
        default_opt = (base.opt_height, base.opt_width)
        fits = lo[0] <= default_opt[0] <= hi[0] and lo[1] <= default_opt[1] <= hi[1]
        opt_size = default_opt if fits else lo
    return ShapeProfile(
        min_batch=1,
        opt_batch=1,
        max_batch=max_batch,
        min_height=lo[0],
        opt_height=opt_size[0],
        max_height=hi[0],
        min_width=lo[1],
        opt_width=opt_size[1],
        max_width=hi[1],
        max_prompt_windows=max_prompt_windows,
    )
