"""Draw an outline hint for the ``shapes`` outline ControlNet: a shape's canny edges, white on black, 128x128.

    python -m sdtrt.shapes.hint --shape square --centre 40,80 --radius 24 --out hint.png

The same picture as drawing the shape filled in any colour that stands out from its background and running
``--control-preprocess canny`` on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from . import data
from .control_data import outline_hint


def _centre(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected the centre as X,Y in pixels (e.g. 40,80), got {text!r}") from exc
    return x, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtrt.shapes.hint", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=data.SHAPES, required=True)
    parser.add_argument("--centre", type=_centre, required=True, help="X,Y of the shape's centre in pixels")
    parser.add_argument("--radius", type=int, required=True, help="half the shape's width in pixels")
    parser.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    args = parser.parse_args(argv)
    x, y, r = args.centre[0], args.centre[1], args.radius
    if r < 4 or min(x - r, y - r) < 0 or max(x + r, y + r) >= data.IMAGE_SIZE:
        parser.error(
            f"expected a shape inside the {data.IMAGE_SIZE}x{data.IMAGE_SIZE} image with a radius of at least 4; "
            f"got centre {x},{y} and radius {r}; move the centre or shrink the radius"
        )
    Image.fromarray(outline_hint(args.shape, (x, y), r)).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
