"""Optional dependencies, imported on demand with one clear error when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from sdtrt.runtime.errors import MissingDependencyError


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
