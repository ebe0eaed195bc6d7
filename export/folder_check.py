"""What checking a folder means, by what its manifest says it holds (the library side of ``sdtrt check``).

- an engine folder: every TensorRT engine against ONNX Runtime at its profile's min, opt and max shapes;
- an ONNX artifact: every component against the PyTorch module it came from (``export.check``);
- with an int8/fp8 UNet: the other components as above, the UNet judged by the quality report instead (on random
  inputs outside its calibrated ranges a direct comparison says little);
- a float artifact given a prompt-adherence step: the components as above, plus that step's report.

What is particular to one model (the quality report's prompts and sampler, a prompt-adherence step) is passed in
by the caller as plain config; nothing here knows any model by name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sdtrt.export.check import CheckRow, check_artifacts
from sdtrt.runtime.files import write_text_atomic
from sdtrt.runtime.manifest import read_manifest

if TYPE_CHECKING:
    from sdtrt.calibrate.report import ReportConfig

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

    seed: seed of the random inputs. references: for an int8/fp8 UNet, the float artifacts to compare with
    (default: the one it was calibrated from). quality: the quality-report config for an int8/fp8 UNet (None: the
    default config). adherence: a step that scores a float artifact folder on what its images show (None: none).
    """

    seed: int = 0
    references: tuple[Path, ...] = ()
    quality: ReportConfig | None = None
    adherence: Callable[[Path], CheckReport] | None = None


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
) -> CheckOutcome:
    """Check the engine or artifact folder ``folder`` as its manifest says (see the module docstring).

    ``notify`` hears a note before a long report starts (default: the log).
    """
    options = options or CheckOptions()
    root = Path(folder)
    manifest = read_manifest(root)
    if manifest.kind == "tensorrt":
        from sdtrt.export.engine_check import check_engines

        return CheckOutcome("engines", tuple(check_engines(root, seed=options.seed)))
    quantized = tuple(n for n, e in manifest.components.items() if e.precision in QUANTIZED_PRECISIONS)
    rows = tuple(r for r in check_artifacts(root, seed=options.seed) if r.component not in quantized)
    if quantized:
        from sdtrt.calibrate.report import quality_report

        (notify or log.info)(f"{', '.join(quantized)}: quantized, measured by the quality report")
        report = quality_report(root, options.references, options.quality)
        return CheckOutcome("quantized", rows, quantized, report)
    if options.adherence is not None:
        return CheckOutcome("adherence", rows, report=options.adherence(root))
    return CheckOutcome("artifact", rows)
