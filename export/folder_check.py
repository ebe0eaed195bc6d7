"""What checking a folder means, by what its manifest says it holds (the library side of ``sdtrt check``).

- an engine folder: every TensorRT engine against ONNX Runtime at its profile's min, opt and max shapes;
- an ONNX artifact: every component against the PyTorch module it came from (``export.check``);
- with an int8/fp8 UNet: the other components as above, the UNet judged by the quality report instead (on random
  inputs outside its calibrated ranges a direct comparison says little);
- a float artifact given a prompt-adherence step: the components as above, plus that step's report.

The reports are passed in by the caller as plain callables (folder -> report): the quality report of a quantized
UNet lives in ``calibrate/`` (which depends on ``export/``, not the reverse), and what is particular to one model
(its report prompts and sampler, a prompt-adherence step) is the caller's config; nothing here knows any model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from sdtrt.export.check import CheckRow, check_artifacts
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.files import write_text_atomic
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.progress import Progress

log = logging.getLogger(__name__)

QUANTIZED_PRECISIONS = ("int8", "fp8")
# The end of the summary line when everything passed, by the kind of check.
PASSED_SUFFIX = {
    "engines": " (TensorRT vs ONNX Runtime)",
    "quantized": ", quality report passed",
    "adherence": ", prompt adherence passed",
    "artifact": "",
}


class CheckReport(Protocol):
    """A report judged beside the rows: a quantized UNet's quality report, or a prompt-adherence report."""

    @property
    def passed(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CheckOptions:
    """How to check a folder.

    seed: seed of the random inputs. quality: the quality report of a folder with an int8/fp8 UNet, e.g.
    ``functools.partial(sdtrt.calibrate.measure.quality_report, references=..., config=...)``; required for such a
    folder. adherence: a step that scores a float artifact folder on what its images show (None: none). Both are
    called as ``f(folder)``, or ``f(folder, progress=progress)`` when ``check_folder`` is given a progress callback.
    """

    seed: int = 0
    quality: Callable[..., CheckReport] | None = None
    adherence: Callable[..., CheckReport] | None = None


@dataclass(frozen=True)
class CheckOutcome:
    """The rows of a check, the report judged beside them (if any), and the verdict.

    kind: "engines", "artifact", "quantized" (``report`` is the quality report, the ``quantized`` components have
    no rows) or "adherence" (``report`` is what the adherence step returned).
    """

    kind: str
    rows: tuple[CheckRow, ...]
    quantized: tuple[str, ...] = ()
    report: CheckReport | None = None

    @property
    def failed_rows(self) -> list[CheckRow]:
        return [r for r in self.rows if not r.passed]

    @property
    def report_failed(self) -> bool:
        return self.report is not None and not self.report.passed

    @property
    def passed(self) -> bool:
        return not self.failed_rows and not self.report_failed

    @property
    def summary(self) -> str:
        """One line: how many checks passed or failed, and the report's verdict."""
        failed = self.failed_rows
        if self.passed:
            return f"all {len(self.rows)} checks passed" + PASSED_SUFFIX[self.kind]
        what = f"{len(failed)} of {len(self.rows)} checks failed" if failed else "all checks passed"
        return what + (", quality report failed" if self.report_failed else "")

    def rows_json(self) -> str:
        """The rows as a JSON list, each with its verdict."""
        return json.dumps([asdict(r) | {"passed": r.passed} for r in self.rows], indent=2)

    def save_report(self, path: str | os.PathLike[str]) -> None:
        """Write the report (if there is one) as JSON."""
        if self.report is None:
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(self.report.to_dict(), indent=2) + "\n")


def check_folder(
    folder: str | os.PathLike[str],
    options: CheckOptions | None = None,
    notify: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> CheckOutcome:
    """Check the engine or artifact folder ``folder`` as its manifest says (see the module docstring).

    ``notify`` hears a note before a long report starts (default: the log); ``progress`` hears (phase, done,
    total) from the component comparison and from the report.
    """
    options = options or CheckOptions()
    root = Path(folder)
    manifest = read_manifest(root)
    if manifest.kind == "tensorrt":  # engines are checked against their ONNX files, quantized ones too
        from sdtrt.export.engine_check import check_engines

        return CheckOutcome("engines", tuple(check_engines(root, seed=options.seed)))
    quantized = tuple(n for n, e in manifest.components.items() if e.precision in QUANTIZED_PRECISIONS)
    if quantized and options.quality is None:
        raise ConfigError(
            f"{root} holds quantized components ({', '.join(quantized)}), which are judged by a quality report; "
            "pass CheckOptions(quality=functools.partial(sdtrt.calibrate.measure.quality_report, ...))"
        )
    rows = tuple(r for r in check_artifacts(root, seed=options.seed, progress=progress) if r.component not in quantized)
    with_progress = {"progress": progress} if progress else {}
    if quantized:
        (notify or log.info)(f"{', '.join(quantized)}: quantized, measured by the quality report")
        return CheckOutcome("quantized", rows, quantized, options.quality(root, **with_progress))
    if options.adherence is not None:
        return CheckOutcome("adherence", rows, report=options.adherence(root, **with_progress))
    return CheckOutcome("artifact", rows)
