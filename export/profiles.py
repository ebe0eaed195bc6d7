"""Default and user-given shape profiles for export."""

from __future__ import annotations

from sdtrt.runtime.models.bundle import ModelBundle
from sdtrt.runtime.profile import ShapeProfile

Size = tuple[int, int]  # (height, width)


# A model whose native size is unknown gets SD 1.5's; the largest default side keeps activations sane.
FALLBACK_NATIVE = 512
MAX_DEFAULT_SIDE = 2048
DEFAULT_PROMPT_WINDOWS = 3  # A1111 users type long prompts: 225 tokens before anything is dropped


def default_profile(bundle: ModelBundle) -> ShapeProfile:
    """From the model's native size N (UNet sample size x VAE factor): min N/2, opt N, max 2N (at most 2048).

    512 for SD 1.5 (256..1024), 768 for SD 2.x-v, 1024 for SDXL (512..2048), 512 for SDXL-Turbo, 128 for tiny
    and tiny-xl (64..256). A model that declares the sizes it draws well (``bundle.size_range``) stays inside
    them: ``shapes``, trained at 128 only, gets 128..128. Batch 1..4; prompts up to 3 windows of 75 tokens.
    Sides are rounded to the model's size multiple.
    """
    model = bundle.model
    native = model.native_size or FALLBACK_NATIVE
    step = model.size_multiple
    low, high = bundle.size_range or (0, MAX_DEFAULT_SIDE)

    def fit(side: int) -> int:
        return max(step, round(min(max(side, low), high) / step) * step)

    return ShapeProfile(
        max_batch=4,
        min_height=fit(native // 2),
        opt_height=fit(native),
        max_height=fit(2 * native),
        min_width=fit(native // 2),
        opt_width=fit(native),
        max_width=fit(2 * native),
        max_prompt_windows=DEFAULT_PROMPT_WINDOWS,
    )


def outside_size_range(bundle: ModelBundle, profile: ShapeProfile) -> str | None:
    """A warning when ``profile`` allows sizes the model does not draw well (``bundle.size_range``), else None."""
    if bundle.size_range is None:
        return None
    low, high = bundle.size_range
    sides = (profile.min_height, profile.min_width, profile.max_height, profile.max_width)
    if low <= min(sides) and max(sides) <= high:
        return None
    trained = f"{low}x{low}" if low == high else f"{low}..{high} pixels a side"
    return (
        f"this model was trained at {trained}; the profile allows {profile.min_width}x{profile.min_height} to "
        f"{profile.max_width}x{profile.max_height}, and images at other sizes come out as blobs or blurred"
    )


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
