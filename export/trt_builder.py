"""Build one TensorRT engine from one ONNX file: ``build(onnx_path, profiles, options) -> plan path``.

The network is strongly typed: every tensor keeps the type the ONNX graph gives it (an fp16 graph makes an fp16
engine, its fp32 norms and timestep stay fp32), and no precision flag is ever set. That is the only mode TensorRT
11 has, and the same code path on 10.x (see ``sdtrt.runtime.backends.trt_compat``). One optimization profile
covers the (min, opt, max) shape of every input; TensorRT tunes its kernels for ``opt``. ``refittable`` sets
``BuilderFlag.REFIT`` (weights replaceable later, with any values; not ``REFIT_IDENTICAL`` or ``STRIP_PLAN``).

Timing cache: ``--timing-cache FILE`` is read if present and written after each build. TensorRT rejects a cache
made by another TensorRT version or GPU (by its header); sdtrt then never overwrites that file: it builds with the
cache kept for this TensorRT and GPU beside it, ``FILE`` with ``.trt<version>-cc<capability>`` before its suffix
(fresh the first time), and saves to that one. Pass either path next time.

``tensorrt`` is imported inside ``build``, so this module imports without it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from sdtrt.runtime.backends import trt_compat
from sdtrt.runtime.errors import BuildError
from sdtrt.runtime.files import write_bytes_atomic
from sdtrt.runtime.specs import COMPONENTS, CONTROLNET_PREFIX, is_controlnet

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profiles = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shape
# Options that change the engine itself; the timing cache only changes how long a build takes.
KEY_FIELDS = ("opt_level", "refittable", "workspace_gib")
MAX_DIMS = 8  # TensorRT's Dims holds at most this many dimensions


@dataclass(frozen=True)
class TensorRTBuildOptions:
    """How TensorRT builds engines.

    opt_level: builder optimization level 0-5 (TensorRT's default 3); higher searches longer for faster kernels.
    timing_cache: file of kernel timings reused across builds (read if present, written after each build).
    refittable: build engines whose weights can be replaced later (LoRA) without a rebuild.
    workspace_gib: cap on TensorRT's scratch memory while building and running; None lets TensorRT choose.
    components: which components ``build_engines`` builds: names of ``COMPONENTS`` (skipped where the artifact
        lacks them; ``unet`` brings ``unet_shallow`` with it) and ``controlnet_<name>`` ControlNets (which the
        artifact must have); None builds every component the artifact has, its ControlNets included.
    """

    opt_level: int = 3
    timing_cache: Path | None = None
    refittable: bool = False
    workspace_gib: float | None = None
    components: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.opt_level, bool) or not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise BuildError(
                f"builder optimization level must be an integer from 0 to 5, found {self.opt_level!r}; "
                "use 3 (TensorRT's default) unless you want a faster build (lower) or a longer kernel search (higher)"
            )
        if self.timing_cache is not None:
            cache = Path(self.timing_cache)
            object.__setattr__(self, "timing_cache", cache)
            if cache.is_dir():
                raise BuildError(f"timing cache must be a file path, found a folder at {str(cache)!r}; name a file")
        if self.workspace_gib is not None and not (
            isinstance(self.workspace_gib, int | float) and not isinstance(self.workspace_gib, bool)
        ):
            raise BuildError(f"workspace must be a number of GiB, found {self.workspace_gib!r}")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise BuildError(f"workspace must be > 0 GiB, found {self.workspace_gib}; omit it to let TensorRT choose")
        if self.components is not None:
            object.__setattr__(self, "components", check_components(self.components))

    def key(self) -> dict[str, object]:
        """The settings that change the engine (and so belong in its build key)."""
        return {name: getattr(self, name) for name in KEY_FIELDS}


def check_components(components: Sequence[str]) -> tuple[str, ...]:
    """``components`` as a tuple once every name is a network of ``COMPONENTS`` or a ``controlnet_<name>``, each
    once; BuildError otherwise."""
    names = tuple(components)
    unknown = [c for c in names if c not in COMPONENTS and not (is_controlnet(c) and c != CONTROLNET_PREFIX)]
    if unknown or not names or len(set(names)) != len(names):
        raise BuildError(
            f"components must be distinct names from {', '.join(COMPONENTS)} or {CONTROLNET_PREFIX}<name> for a "
            f"ControlNet, found {list(names)}; e.g. --components unet,vae_decoder,{CONTROLNET_PREFIX}canny, or "
            "leave --components out to build everything the artifact has"
        )
    return names


def build(
    onnx_path: str | os.PathLike[str],
    profiles: Profiles,
    options: TensorRTBuildOptions,
    *,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Build an engine from ``onnx_path`` for the shape ranges ``profiles``; write it to ``out`` (default: the ONNX
    path with ``.plan``) atomically and return that path. Needs tensorrt and an NVIDIA GPU.
    """
    trt_compat.require_tensorrt("building TensorRT engines")
    device = trt_compat.engine_device(None, BuildError)
    import tensorrt as trt

    source = Path(onnx_path)
    target = Path(out) if out is not None else source.with_suffix(".plan")
    trt_logger = trt_compat.logger()
    trt_compat.take_errors()
    builder = trt_compat.create_builder(BuildError)
    network = builder.create_network(trt_compat.network_flags())
    parse_onnx(trt.OnnxParser(network, trt_logger), source)
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    add_profile(builder, network, config, profiles, source.name)
    cache, cache_target = attach_timing_cache(config, options.timing_cache, trt_compat.environment(device))
    trt_compat.take_errors()  # a rejected cache was reported above; only the build's errors from here on
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            f"TensorRT could not build an engine from {source.name} (build_serialized_network): "
            + trt_compat.error_text()
        )
    if cache is not None and cache_target is not None:
        cache_target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache_target, bytes(cache.serialize()))
    del cache
    write_bytes_atomic(target, bytes(serialized))
    return target


def parse_onnx(parser: trt.OnnxParser, path: Path) -> None:
    """Parse the ONNX file (and its external-data file beside it) into the parser's network."""
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise BuildError(
            f"TensorRT's ONNX parser could not read {path.name} (parse_from_file): "
            + ("; ".join(errors) or "no error description")
            + ". Check that the artifact is complete (sdtrt check) and that this TensorRT supports its opset"
        )


def add_profile(
    builder: trt.Builder,
    network: trt.INetworkDefinition,
    config: trt.IBuilderConfig,
    profiles: Profiles,
    what: str,
) -> None:
    """One optimization profile with the (min, opt, max) shape of every network input."""
    import tensorrt as trt

    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profiles):
        raise BuildError(
            f"{what} has inputs {names}, but shape ranges were given for {sorted(profiles)}; "
            "the artifact and its manifest disagree: re-export the artifact"
        )
    deep = {name: len(shapes[0]) for name, shapes in profiles.items() if len(shapes[0]) > MAX_DIMS}
    if deep:
        raise BuildError(
            f"{what}: TensorRT tensors have at most {MAX_DIMS} dimensions, but inputs {deep} (name: rank) have more; "
            "the artifact's manifest is wrong: re-export the artifact"
        )
    profile = builder.create_optimization_profile()
    for name in names:
        low, opt, high = profiles[name]
        profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"TensorRT rejected the shape ranges {profiles} of {what} (add_optimization_profile)")


def sibling_cache(path: Path, environment: Mapping[str, str]) -> Path:
    """The timing cache for this TensorRT and GPU kept beside ``path`` when ``path`` holds one made elsewhere."""
    tag = f"trt{environment['tensorrt']}-cc{environment['compute_capability']}"
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def attach_timing_cache(
    config: trt.IBuilderConfig, path: Path | None, environment: Mapping[str, str]
) -> tuple[trt.ITimingCache | None, Path | None]:
    """Attach the timing cache the build should use to ``config``: (that cache or None, the file to save it to).

    ``path`` if TensorRT accepts it; else the sibling cache for this TensorRT and GPU if that exists and is
    accepted; else a fresh cache, saved to ``path`` only when there was no file there (never over a user's cache
    made elsewhere). Without ``path`` a fresh cache is used and nothing is saved.
    """
    if path is None:
        return fresh_timing_cache(config), None
    sibling = sibling_cache(path, environment)
    for candidate in (path, sibling):
        if not candidate.is_file():
            continue
        data = candidate.read_bytes()
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, False):
            log.info("using timing cache %s (%.1f KiB)", candidate, len(data) / 1024)
            return cache, candidate
        why = "could not read it" if cache is None else "rejected its header"
        log.warning(
            "timing cache %s was made by another TensorRT version or GPU (TensorRT %s %s: %s); not using it",
            candidate,
            environment["tensorrt"],
            why,
            "; ".join(trt_compat.take_errors()) or "no message",
        )
    target = sibling if path.is_file() else path
    if path.is_file():
        log.warning(
            "building with a fresh timing cache for TensorRT %s on compute capability %s, saved to %s; %s is left "
            "as it is (pass --timing-cache %s next time, or delete %s to reuse its name)",
            environment["tensorrt"],
            environment["compute_capability"],
            target,
            path,
            target,
            path,
        )
    return fresh_timing_cache(config), target


def fresh_timing_cache(config: trt.IBuilderConfig) -> trt.ITimingCache | None:
    """A new, empty timing cache attached to ``config``; None (logged) when TensorRT cannot make one."""
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning(
            "TensorRT could not create a timing cache (create_timing_cache returned %s: %s); building without one",
            "None" if cache is None else "a cache set_timing_cache refused",
            "; ".join(trt_compat.take_errors()) or "no message",
        )
        return None
    return cache


class PeakDeviceMemory:
    """Peak device memory in use while the block runs, above the level at its start, in bytes.

    TensorRT allocates through its own allocator, so ``torch.cuda.max_memory_allocated`` cannot see a build. This
    samples the device's free memory (``torch.cuda.mem_get_info``, i.e. cudaMemGetInfo) every ``interval`` seconds
    on a thread: it counts every process on the GPU and can miss a spike shorter than the interval, so read it as
    an estimate. ``peak`` is None off CUDA.
    """

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device = device
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_free = 0
        self._min_free = 0

    def _sample(self) -> None:
        free, _ = torch.cuda.mem_get_info(self.device)
        self._min_free = min(self._min_free, free)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakDeviceMemory:
        if self.device.type == "cuda":
            self._start_free = self._min_free = torch.cuda.mem_get_info(self.device)[0]
            self._thread = threading.Thread(target=self._run, name="sdtrt-peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self.peak = self._start_free - self._min_free
