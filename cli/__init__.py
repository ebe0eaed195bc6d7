"""The ``sdtrt`` command line: the group, logging, and every user error as one line with exit code 1.

Library errors, file system errors (``OSError``) and click's usage errors (a bad or missing option) all print
``error: ...`` on one line and exit 1, as the README promises; ``-vv`` shows the traceback of the first two.
Each command lives in its own module (options -> config dataclass -> one library call -> printed result) and is
added to the group here.
"""

from __future__ import annotations

import errno
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

# click >= 8.2 raises this for a bare ``sdtrt`` to print the help (8.1 exits instead): it stays click's.
NO_ARGS_HELP: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if e is not None
)

# Loggers of libraries that talk a lot at INFO; silenced below -vv.
NOISY_LOGGERS = ("polygraphy", "onnx_graphsurgeon", "diffusers", "transformers", "torch")


class OneLineUsageError(click.ClickException):
    """A click usage error shown as one ``error:`` line (with where to find the usage) and exit code 1."""

    exit_code = 1

    def __init__(self, error: click.UsageError) -> None:
        super().__init__(" ".join(error.format_message().split()).rstrip("."))
        self.command_path = error.ctx.command_path if error.ctx else "sdtrt"

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message} (see `{self.command_path} --help`)", err=True)


def os_error_line(exc: OSError) -> str:
    """``exc`` as one line: what failed, on which path(s), and what to check."""
    paths = " -> ".join(repr(str(p)) for p in (exc.filename, exc.filename2) if p is not None)
    where = f" on {paths}" if paths else ""
    return f"{exc.strerror or exc}{where}; check that the path exists and that you may read or write it"


class SdtrtGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1 (a traceback only with -vv)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except NO_ARGS_HELP:
            raise
        except click.UsageError as exc:
            raise OneLineUsageError(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise OneLineUsageError(exc) from None
        except (SdtrtError, OSError) as exc:
            if logging.getLogger().level <= logging.DEBUG:
                raise
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # click handles a closed stdout quietly
            line = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
            click.echo(f"error: {line}", err=True)
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
