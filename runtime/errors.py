"""The one exception hierarchy of sdtrt.

Every message says what was expected, what was found, and how to fix it. The CLI turns any ``SdtrtError`` into
a one-line message and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SdtrtError(Exception):
    """Base class of every error sdtrt raises on purpose."""


class SourceError(SdtrtError):
    """A model source (folder, checkpoint, preset) cannot be used."""


class LoraError(SourceError):
    """A LoRA file cannot be read, or does not fit the model it is applied to."""


class ControlError(SdtrtError):
    """A ControlNet input cannot be used (an unreadable, empty or unsupported hint image)."""


class ExportError(SdtrtError):
    """Exporting a component to ONNX failed."""


class ArtifactError(SdtrtError):
    """An artifact folder or its manifest is missing, corrupt, unsafe or of another schema version."""


class ShapeError(SdtrtError):
    """A requested size or batch does not fit a profile or the model's constraints."""


class CheckError(SdtrtError):
    """A numerical check of an exported component against PyTorch failed."""


class BuildError(SdtrtError):
    """Building an engine failed."""


class BackendError(SdtrtError):
    """A backend cannot run here or was asked for something it cannot do."""


class MissingDependencyError(SdtrtError):
    """An optional dependency that a feature needs is not installed."""


class ConfigError(SdtrtError):
    """An option has a value outside what is allowed (unknown scheduler or backend name, bad setting)."""


class NumericsError(SdtrtError):
    """A network produced NaN or Inf values (typically fp16 overflow)."""
