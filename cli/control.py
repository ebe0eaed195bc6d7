"""The ``--control`` options of ``sdtrt generate``: ControlNets of the artifact, their hints and settings.

--control NAME:IMAGE[:SCALE[:START:END]]   repeatable, one per ControlNet
--control-preprocess canny|none            once for all controls, or once per --control in order
--control-resize MODE                      likewise (just_resize, crop_and_resize, resize_and_fill)
--canny-low / --canny-high                 canny thresholds (A1111's 100 / 200)
--guess-mode                               "ControlNet is more important", for every control
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def control_options(function: F) -> F:
    """The ControlNet options, in the order ``--help`` lists them."""
    options = [
        click.option(
            "--control",
            "controls",
            multiple=True,
            metavar="NAME:IMAGE[:SCALE[:START:END]]",
            help="Run the artifact's ControlNet NAME with the hint IMAGE, at SCALE (1) from START to END (0 to 1, "
            "fractions of the steps). Repeatable, one per ControlNet.",
        ),
        click.option(
            "--control-preprocess",
            "preprocess",
            multiple=True,
            help="canny or none (default: none, the image is the hint): once for all controls or once per --control.",
        ),
        click.option(
            "--control-resize",
            "resize",
            multiple=True,
            help="How a hint of another size is fitted: just_resize, crop_and_resize (default) or resize_and_fill; "
            "once for all controls or once per --control.",
        ),
        click.option("--canny-low", type=int, default=100, show_default=True, help="Canny low threshold, 1-255."),
        click.option("--canny-high", type=int, default=200, show_default=True, help="Canny high threshold, 1-255."),
        click.option(
            "--guess-mode",
            is_flag=True,
            help="ControlNet is more important (A1111): run ControlNets on the prompt only, residuals ramped.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def parse_control(text: str) -> tuple[str, str, float, float, float]:
    """``NAME:IMAGE[:SCALE[:START:END]]`` -> (name, image path, scale, start, end); a usage error otherwise."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not rest:
        raise click.BadParameter(
            f"expected NAME:IMAGE[:SCALE[:START:END]], e.g. canny:edges.png:0.8, got {text!r}", param_hint="--control"
        )
    parts = rest.split(":")
    numbers: list[float] = []
    for count in (3, 1):  # the longest numeric tail that leaves a path
        if len(parts) > count and all(_is_number(p) for p in parts[-count:]):
            numbers = [float(p) for p in parts[-count:]]
            parts = parts[:-count]
            break
    scale, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers) :]) if len(numbers) != 1 else (numbers[0], 0.0, 1.0)
    return name, ":".join(parts), scale, start, end


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _per_control(values: Sequence[str], count: int, option: str, default: str) -> list[str]:
    if not values:
        return [default] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise click.BadParameter(
            f"give it once for all controls or once per --control ({count}), got {len(values)}", param_hint=option
        )
    return list(values)


def read_controls(
    controls: Sequence[str],
    preprocess: Sequence[str],
    resize: Sequence[str],
    canny_low: int,
    canny_high: int,
    guess_mode: bool,
) -> list[Any]:
    """The ``ControlInput`` of each --control, its hint image read now so a bad file fails before any work."""
    from sdtrt.runtime.control.hint import load_hint_image
    from sdtrt.runtime.control.inputs import ControlInput

    if not controls:
        for option, given in (("--control-preprocess", preprocess), ("--control-resize", resize)):
            if given:
                raise click.BadParameter("it applies to ControlNets: add --control NAME:IMAGE", param_hint=option)
        if guess_mode:
            raise click.BadParameter("it applies to ControlNets: add --control NAME:IMAGE", param_hint="--guess-mode")
        return []
    modes = _per_control(preprocess, len(controls), "--control-preprocess", "none")
    fits = _per_control(resize, len(controls), "--control-resize", "crop_and_resize")
    inputs = []
    for text, mode, fit in zip(controls, modes, fits, strict=True):
        name, path, scale, start, end = parse_control(text)
        inputs.append(
            ControlInput(
                name,
                load_hint_image(path),
                scale=scale,
                start=start,
                end=end,
                guess_mode=guess_mode,
                resize_mode=fit,
                preprocess=mode,
                low_threshold=canny_low,
                high_threshold=canny_high,
            )
        )
    return inputs
