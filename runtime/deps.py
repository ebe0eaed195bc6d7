"""Optional dependencies, imported on demand with one clear error when missing."""

from __future__ import annotations

import importlib
import logging
import re
from types import ModuleType

from sdtrt.runtime.errors import MissingDependencyError

# transformers tells, once per class, that an image processor falls back to its PIL version without torchvision.
# sdtrt never uses image processors (diffusers' pipelines merely import them), so the notice is noise to a user.
_FALLBACK_NOTICE = re.compile(r"requires torchvision \(not installed\); falling back to")
_NOTICE_LOGGER = "transformers.utils.import_utils"


class _DropFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _FALLBACK_NOTICE.search(record.getMessage())


def silence_fallback_notices() -> None:
    """Keep transformers' "requires torchvision ... falling back" notices out of the output; nothing else.

    A filter on that one logger (not a level), so it holds after transformers configures its own loggers.
    """
    logger = logging.getLogger(_NOTICE_LOGGER)
    if not any(isinstance(f, _DropFallbackNotice) for f in logger.filters):
        logger.addFilter(_DropFallbackNotice())


silence_fallback_notices()  # before any module of sdtrt imports diffusers or transformers


def require(module: str, feature: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ``MissingDependencyError`` naming the feature and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the Python module '{module}', which failed to import ({exc}). "
            f'Install it with: pip install "sdtrt[{extra}]"'
        ) from exc


def version_of(distribution: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
