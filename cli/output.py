"""Where ``sdtrt generate`` writes its images: the file ``--out`` names, or numbered files inside a folder.

An ``--out`` that is an existing folder, or ends in ``/``, is a folder: images go in as ``00001-SEED.png``
(A1111's names), numbered on from the highest number already there, so nothing in it is overwritten.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from sdtrt.cli.options import writable_folder

# A1111 numbers a folder's images by the digits before the first "-" of each name; so does sdtrt, to share one.
NUMBERED = re.compile(r"(\d+)-")


@dataclass(frozen=True)
class OutputTarget:
    """``--out``, decided before any work: a file (``folder`` False) or a folder to number images in."""

    path: Path
    folder: bool

    def paths(self, seeds: Sequence[int]) -> list[Path]:
        """One file per image of ``seeds``: OUT, or OUT-0.png, OUT-1.png, ..., or the folder's next numbers.

        Call it just before writing: a folder is scanned then, so images another run wrote meanwhile are kept.
        """
        if self.folder:
            first = next_number(self.path)
            return [self.path / f"{first + k:05d}-{seed}.png" for k, seed in enumerate(seeds)]
        if len(seeds) == 1:
            return [self.path]
        suffix = self.path.suffix or ".png"
        return [self.path.with_name(f"{self.path.stem}-{k}{suffix}") for k in range(len(seeds))]


def output_target(text: str) -> OutputTarget:
    """``--out`` as a target; raise ``click.UsageError`` unless its folder can be created and written (and, for
    a file, a file of that name created in it)."""
    path = Path(text)
    try:
        folder = text.endswith(("/", os.sep)) or path.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system
        raise click.UsageError(f"cannot write the image to {text!r} ({exc.strerror}); choose another --out") from None
    writable_folder(path if folder else path.parent, "images" if folder else "the image")
    if not folder:
        try:  # the temporary name the PNG is first written under (see runtime.files.write_bytes_atomic)
            handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(handle)
            os.unlink(name)
        except OSError as exc:
            raise click.UsageError(
                f"cannot write the image to {text!r} ({exc.strerror}); choose another file name"
            ) from None
    return OutputTarget(path, folder)


def next_number(folder: Path) -> int:
    """1 + the highest number starting a file name in ``folder`` (1 in an empty folder)."""
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := NUMBERED.match(name))]
    return max(numbers, default=0) + 1
