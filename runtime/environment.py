"""What this machine runs: Python, torch and its CUDA, the optional libraries, the CPU and the GPUs.

Gathered in one place for ``sdtrt doctor`` and for the environment recorded with every benchmark row.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
from dataclasses import dataclass, field

import torch

from sdtrt.runtime.deps import version_of

# The optional libraries a report names, in the order it lists them.
LIBRARIES = ("tensorrt", "onnxruntime", "onnx", "diffusers", "transformers")


@dataclass(frozen=True)
class LibraryInfo:
    """One library as it imports here: its version, or why it does not import."""

    name: str
    version: str | None  # None when it does not import
    error: str | None = None  # the import error of a library that is installed but broken
    providers: tuple[str, ...] = ()  # onnxruntime: its execution providers

    @property
    def installed(self) -> bool:
        return self.version is not None

    def describe(self) -> str:
        """'1.20.1', '1.20.1 (CPUExecutionProvider)', 'not installed' or 'fails to import (...)'."""
        if self.error is not None:
            return f"fails to import ({self.error})"
        if self.version is None:
            return "not installed"
        return self.version + (f" ({', '.join(self.providers)})" if self.providers else "")


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as torch sees it."""

    index: int
    name: str
    compute_capability: str  # "8.9"
    memory_bytes: int

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


@dataclass(frozen=True)
class Environment:
    """The software and hardware of this process; ``libraries`` maps a module name to what imports."""

    python: str
    platform: str
    cpu: str
    cpus: int | None
    sdtrt: str | None
    torch: str
    torch_cuda: str | None  # the CUDA torch was built for; None for a CPU-only build
    libraries: dict[str, LibraryInfo] = field(default_factory=dict)
    gpus: tuple[GpuInfo, ...] = ()

    def version(self, library: str) -> str | None:
        """The version of ``library`` if it imports, else None."""
        info = self.libraries.get(library)
        return info.version if info else None


def library_info(name: str) -> LibraryInfo:
    """Import ``name`` and read its version (and onnxruntime's providers)."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        return LibraryInfo(name, None)
    except Exception as exc:  # installed but broken (a wrong CUDA build, a missing shared library): say why
        return LibraryInfo(name, None, error=str(exc))
    version = str(getattr(module, "__version__", "?"))
    providers = tuple(module.get_available_providers()) if name == "onnxruntime" else ()
    return LibraryInfo(name, version, providers=providers)


def cuda_gpus() -> tuple[GpuInfo, ...]:
    """The CUDA devices torch can use (none without a CUDA build or a GPU)."""
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(index, props.name, f"{props.major}.{props.minor}", int(props.total_memory)))
    return tuple(gpus)


def gather_environment(libraries: tuple[str, ...] = LIBRARIES) -> Environment:
    """Versions of Python, sdtrt, torch and ``libraries`` (each imported), the CPU and the CUDA devices."""
    return Environment(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        sdtrt=version_of("sdtrt"),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        libraries={name: library_info(name) for name in libraries},
        gpus=cuda_gpus(),
    )


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` ('' when it prints none), or None when it cannot run."""
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except OSError:
        return None
