"""The ``sdtrt`` command line: the group, logging, and library errors as one line with exit code 1.

Each command lives in its own module (options -> config dataclass -> one library call -> printed result) and is
added to the group here.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from sdtrt.cli.bench import bench_cmd
from sdtrt.cli.calibrate import calibrate_cmd
from sdtrt.cli.check import check_cmd
from sdtrt.cli.doctor import doctor_cmd
from sdtrt.cli.export import build_cmd, export_cmd
from sdtrt.cli.generate import generate_cmd
from sdtrt.cli.serve import serve_cmd
from sdtrt.runtime.errors import SdtrtError

# Loggers of libraries that talk a lot at INFO; silenced below -vv.
NOISY_LOGGERS = ("polygraphy", "onnx_graphsurgeon", "diffusers", "transformers", "torch")


class SdtrtGroup(click.Group):
    """Turns library errors into one line on stderr and exit code 1 (a traceback only with -v)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SdtrtError as exc:
            if logging.getLogger().level <= logging.DEBUG:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


def setup_logging(verbose: int, quiet: bool) -> None:
    """Log to stderr at the level -v/-q ask for; library chatter and warnings only when debugging."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    if verbose < 2:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if level > logging.DEBUG:
        import warnings

        warnings.filterwarnings("ignore")


@click.group(cls=SdtrtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More output; -vv shows debug logs and tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="sdtrt")
def main(verbose: int, quiet: bool) -> None:
    """Export Stable Diffusion to ONNX / TensorRT and run it fast."""
    setup_logging(verbose, quiet)


for command in (export_cmd, build_cmd, check_cmd, calibrate_cmd, generate_cmd, serve_cmd, bench_cmd, doctor_cmd):
    main.add_command(command)
