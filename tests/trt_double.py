"""A RECORDING TEST DOUBLE of the ``tensorrt`` module. It is not TensorRT and proves nothing about TensorRT.

Tests put ``TensorRTDouble(...).module`` into ``sys.modules["tensorrt"]`` so that sdtrt's build and runtime
orchestration can run on a machine without TensorRT or a GPU. What the double does:

* exposes the names sdtrt calls, spelled as in the TensorRT 10.x Python API (10.1+ by default), or
  (``version="11..."``) as 11.x has them: no precision builder flags, no ``device_memory_size``, no
  ``create_execution_context_without_device_memory``, and ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` = 0
  (deprecated and always on; it is 1 in 10.x), or (``version="10.0..."``) as 10.0 has them: the allocation
  strategy and ``create_execution_context(strategy)``, but the ``device_memory`` setter instead of
  ``set_device_memory`` and ``device_memory_size`` instead of ``device_memory_size_v2``;
* is as strict as the real API where sdtrt can get it wrong: ``Dims`` holds at most 8 dimensions, a tensor address
  must be 256-byte aligned (``set_tensor_address`` returns False otherwise), a timing cache from another TensorRT
  version or GPU is rejected by ``set_timing_cache`` (its header), ``Builder``/``Runtime``/``Refitter`` raise
  pybind11's "factory function returned nullptr" TypeError when TensorRT cannot initialise (``fail_init``) or the
  engine is not refittable, and ``create_timing_cache`` (``fail_timing_cache``), ``build_serialized_network``
  (``fail_build``), ``execute_async_v3`` (``fail_execute``) and the refit (``fail_refit``) can fail;
* "parses" an ONNX file by reading its graph inputs/outputs and initializers with the ``onnx`` package (output
  shapes from the artifact's manifest), and "builds" a plan that is JSON: the interface, the optimization
  profile, a made-up activation memory size and, with ``BuilderFlag.REFIT``, the refittable weights (named after
  the initializers, as TensorRT's ONNX parser names them);
* records every call a test wants to check (network flags, builder flags, optimization level, profiles, timing
  cache loads, contexts, device memory, ``set_input_shape`` calls, tensor addresses, the input bytes of each run,
  refitted weights);
* "executes" by writing the run count into every output buffer (CPU tensors only), through the raw addresses it
  was given, so tests can see that outputs land in the buffers the engine preallocated.

It computes no network, times no kernel, and its plans only load into the double. Whatever a test shows with it
is about sdtrt's bookkeeping, never about TensorRT's results.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = "sdtrt-tensorrt-double"
SCALE = 8  # image side / latent side, as in the tiny model (the double derives VAE output sides with it)
PRECISION_FLAG_NAMES = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS")
NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "BF16": np.uint16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
ONNX_TYPES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "HALF", 16: "BF16"}
MAX_DIMS = 8
ALIGNMENT = 256
NULLPTR = "pybind11::init(): factory function returned nullptr"
CACHE_MAGIC = "sdtrt-double-timing-cache"


@dataclass
class Records:
    networks: list[int] = field(default_factory=list)  # create_network flags
    builds: list[dict[str, Any]] = field(default_factory=list)  # one per build_serialized_network
    timing_cache_loads: list[bytes] = field(default_factory=list)
    deserialized: list[str] = field(default_factory=list)  # network names
    contexts: list[Any] = field(default_factory=list)
    refits: list[dict[str, np.ndarray]] = field(default_factory=list)  # the weights of each successful refit


class TensorRTDouble:
    """One fake ``tensorrt`` module and what was done with it (``records``)."""

    def __init__(
        self,
        version: str = "10.13.0.35",
        memory: dict[str, int] | None = None,
        compute_capability: str = "8.9",
        fail_parse: str | None = None,
        fail_build: bool = False,
        fail_execute: bool = False,
        fail_init: bool = False,
        fail_timing_cache: bool = False,
        fail_refit: bool = False,
        fused: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.version = version
        self.memory = memory or {}
        self.compute_capability = compute_capability  # what the timing cache header records
        self.fail_parse = fail_parse
        self.fail_build = fail_build
        self.fail_execute = fail_execute
        self.fail_init = fail_init
        self.fail_timing_cache = fail_timing_cache
        self.fail_refit = fail_refit
        self.fused = fused  # weight pairs TensorRT refits together (e.g. a kernel and the bias fused into it)
        self.records = Records()
        self.module = self._make_module()

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def api_10_0(self) -> bool:
        """TensorRT 10.0: no ``device_memory_size_v2`` and no ``set_device_memory`` yet (both came in 10.1)."""
        return self.version.split(".")[:2] == ["10", "0"]

    def _make_module(self) -> types.ModuleType:
        module = types.ModuleType("tensorrt")
        module.__dict__["__version__"] = self.version
        module.__dict__["__sdtrt_double__"] = True
        flags = ["REFIT", "TF32", "DEBUG", "REFIT_IDENTICAL", "STRIP_PLAN"]
        if self.major < 11:
            flags += list(PRECISION_FLAG_NAMES)
        creation = {"STRONGLY_TYPED": 0} if self.major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
        names = {
            "ILogger": _ILogger,
            "Logger": _Logger,
            "Dims": Dims,
            "DataType": DataType,
            "TensorIOMode": TensorIOMode,
            "TensorLocation": TensorLocation,
            "Weights": Weights,
            "MemoryPoolType": enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0}),
            "BuilderFlag": enum.IntEnum("BuilderFlag", {name: i for i, name in enumerate(flags)}),
            "NetworkDefinitionCreationFlag": enum.IntEnum("NetworkDefinitionCreationFlag", creation),
            "ExecutionContextAllocationStrategy": AllocationStrategy,
            "Builder": lambda logger: _Builder(self, logger),
            "OnnxParser": lambda network, logger: _OnnxParser(self, network, logger),
            "Runtime": lambda logger: _Runtime(self, logger),
            "Refitter": lambda engine, logger: _Refitter(self, engine, logger),
        }
        module.__dict__.update(names)
        return module

    def init_check(self, logger: Any) -> None:
        """What TensorRT does when it cannot initialise CUDA: a warning, then a nullptr from the factory."""
        if self.fail_init:
            logger.log(_ILogger.Severity.WARNING, "double: CUDA initialization failure with error: 35")
            raise TypeError(NULLPTR)


class _ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity: Any, msg: str) -> None:
        pass


class _Logger(_ILogger):
    def __init__(self, min_severity: Any = None) -> None:
        super().__init__()


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class AllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class TensorLocation(enum.IntEnum):
    DEVICE = 0
    HOST = 1


class Weights:
    """``trt.Weights(dtype, ptr, count)`` or ``trt.Weights(ndarray)``; the double reads the bytes when it is set."""

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], np.ndarray):
            array = args[0]
            names = {np.dtype(v): k for k, v in NUMPY.items() if k != "BF16"}
            self.array: np.ndarray | None = array
            self.dtype, self.ptr, self.size = DataType[names[array.dtype]], array.ctypes.data, array.size
        else:
            self.array = None
            self.dtype, self.ptr, self.size = args[0], int(args[1]), int(args[2])

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(NUMPY[self.dtype.name]).itemsize

    def __len__(self) -> int:
        return self.size


class Dims:
    def __init__(self, shape: list[int] | tuple[int, ...] = ()) -> None:
        if len(shape) > MAX_DIMS:
            raise ValueError(f"double: Dims holds at most {MAX_DIMS} dimensions, got {len(shape)}")
        self.shape = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: int) -> int:
        return self.shape[index]

    def __repr__(self) -> str:
        return f"Dims{self.shape}"


@dataclass
class _Tensor:
    name: str
    dtype: str  # DataType member name
    shape: list[Any]  # ints and symbolic names


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.name = ""
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.weights: dict[str, dict[str, Any]] = {}  # initializer name -> {"dtype", "count"}

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]


class _ParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text


class _OnnxParser:
    def __init__(self, double: TensorRTDouble, network: _Network, logger: Any) -> None:
        self.double, self.network, self.errors = double, network, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> _ParserError:
        return _ParserError(self.errors[index])

    def parse_from_file(self, path: str) -> bool:
        import onnx

        if self.double.fail_parse:
            self.errors.append(self.double.fail_parse)
            return False
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:
            self.errors.append(f"could not load {path}: {exc}")
            return False

        def tensor(info: Any) -> _Tensor:
            kind = info.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in kind.shape.dim]
            return _Tensor(info.name, ONNX_TYPES[kind.elem_type], shape)

        self.network.name = Path(path).stem
        self.network.inputs = [tensor(i) for i in model.graph.input]
        self.network.outputs = [tensor(o) for o in model.graph.output]
        self.network.weights = {
            init.name: {"dtype": ONNX_TYPES[init.data_type], "count": math.prod(init.dims)}
            for init in model.graph.initializer
        }
        # Output dimensions the exporter left unnamed: take the symbolic shapes the manifest beside the file
        # declares (TensorRT itself would infer them through the graph).
        manifest = json.loads((Path(path).parent / "manifest.json").read_text())
        declared = {t["name"]: t["shape"] for t in manifest["components"][self.network.name]["outputs"]}
        for out in self.network.outputs:
            out.shape = declared[out.name]
        return True


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, low: Dims, opt: Dims, high: Dims) -> None:
        self.shapes[name] = [list(low.shape), list(opt.shape), list(high.shape)]


class _TimingCache:
    """Serialized as ``magic|TensorRT version|compute capability|entries``: the header real caches also carry."""

    def __init__(self, version: str, capability: str, entries: int) -> None:
        self.version, self.capability, self.entries = version, capability, entries

    @classmethod
    def parse(cls, data: bytes) -> _TimingCache | None:
        try:
            magic, version, capability, entries = data.decode().split("|")
            assert magic == CACHE_MAGIC
            return cls(version, capability, int(entries))
        except Exception:
            return None

    def serialize(self) -> bytes:
        return f"{CACHE_MAGIC}|{self.version}|{self.capability}|{self.entries}".encode()


class _Config:
    def __init__(self, double: TensorRTDouble, logger: Any) -> None:
        self.double, self.logger = double, logger
        self.builder_optimization_level = 3
        self.flags: list[str] = []
        self.pool_limits: dict[str, int] = {}
        self.profiles: list[_Profile] = []
        self.cache: _TimingCache | None = None

    def set_flag(self, flag: Any) -> None:
        self.flags.append(flag.name)

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool_limits[pool.name] = size

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache | None:
        double = self.double
        double.records.timing_cache_loads.append(bytes(data))
        if double.fail_timing_cache:
            self.logger.log(_ILogger.Severity.ERROR, "double: could not create the timing cache")
            return None
        if not data:
            return _TimingCache(double.version, double.compute_capability, 0)
        cache = _TimingCache.parse(bytes(data))
        if cache is None:
            self.logger.log(_ILogger.Severity.ERROR, "double: the data is not a timing cache")
        return cache

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        here = (self.double.version, self.double.compute_capability)
        if (cache.version, cache.capability) != here and not ignore_mismatch:
            self.logger.log(
                _ILogger.Severity.ERROR,
                f"double: timing cache header mismatch: made by TensorRT {cache.version} on {cache.capability}",
            )
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        assert self.cache is not None
        return self.cache


class _Builder:
    def __init__(self, double: TensorRTDouble, logger: Any) -> None:
        double.init_check(logger)
        self.double, self.logger = double, logger

    def create_network(self, flags: int = 0) -> _Network:
        self.double.records.networks.append(flags)
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config(self.double, self.logger)

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        record = {
            "network": network.name,
            "network_flags": network.flags,
            "flags": list(config.flags),
            "opt_level": config.builder_optimization_level,
            "pool_limits": dict(config.pool_limits),
            "profiles": [p.shapes for p in config.profiles],
        }
        self.double.records.builds.append(record)
        if self.double.fail_build:
            self.logger.log(_ILogger.Severity.ERROR, "double: out of memory while timing tactics")
            return None
        if config.cache is not None:
            config.cache.entries += 1
        profile = config.profiles[0].shapes
        plan = {
            "magic": MAGIC,
            "version": self.double.version,
            "name": network.name,
            "memory": self.double.memory.get(network.name, 1024),
            "inputs": [dict(vars(t), profile=profile[t.name]) for t in network.inputs],
            "outputs": [vars(t) for t in network.outputs],
            "refittable": "REFIT" in config.flags,
            "weights": network.weights if "REFIT" in config.flags else {},
        }
        return json.dumps(plan).encode()


class _Runtime:
    def __init__(self, double: TensorRTDouble, logger: Any) -> None:
        double.init_check(logger)
        self.double, self.logger = double, logger

    def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
        try:
            plan = json.loads(bytes(data).decode())
            assert plan["magic"] == MAGIC
        except Exception:
            self.logger.log(_ILogger.Severity.ERROR, "double: the data is not a plan")
            return None
        if plan["version"] != self.double.version:
            self.logger.log(_ILogger.Severity.ERROR, f"double: plan from TensorRT {plan['version']}")
            return None
        self.double.records.deserialized.append(plan["name"])
        engine_class = _Engine11 if self.double.major >= 11 else _Engine10_0 if self.double.api_10_0 else _Engine10
        return engine_class(self.double, plan)


class _Engine:
    def __init__(self, double: TensorRTDouble, plan: dict[str, Any]) -> None:
        self.double, self.plan = double, plan
        self.tensors = {t["name"]: t for t in plan["inputs"] + plan["outputs"]}
        self.input_names = [t["name"] for t in plan["inputs"]]
        self.weights: dict[str, dict[str, Any]] = plan.get("weights", {})
        self.values: dict[str, np.ndarray] = {}  # weights refitted so far

    @property
    def refittable(self) -> bool:
        return bool(self.plan.get("refittable"))

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.input_names else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self.tensors[name]["dtype"]]

    def get_tensor_profile_shape(self, name: str, index: int) -> list[Dims]:
        return [Dims(s) for s in self.tensors[name]["profile"]]

    def _context(self, strategy: Any) -> _Context:
        context = _Context(self, strategy)
        self.double.records.contexts.append(context)
        return context


class _Engine10(_Engine):
    @property
    def device_memory_size(self) -> int:
        return int(self.plan["memory"]) // 2  # older, smaller figure: sdtrt must prefer the v2 one

    @property
    def device_memory_size_v2(self) -> int:
        return int(self.plan["memory"])

    def create_execution_context(self, strategy: Any = AllocationStrategy.STATIC) -> _Context:
        return self._context(strategy)

    def create_execution_context_without_device_memory(self) -> _Context:
        return self._context("without_device_memory")


class _Engine11(_Engine):
    @property
    def device_memory_size_v2(self) -> int:
        return int(self.plan["memory"])

    def create_execution_context(self, strategy: Any = AllocationStrategy.STATIC) -> _Context:
        return self._context(strategy)


class _Engine10_0(_Engine):
    @property
    def device_memory_size(self) -> int:
        return int(self.plan["memory"])

    def create_execution_context(self, strategy: Any = AllocationStrategy.STATIC) -> _Context:
        return self._context(strategy)

    def create_execution_context_without_device_memory(self) -> _Context:  # deprecated in 10.0
        return self._context("without_device_memory")


class _Context:
    def __init__(self, engine: _Engine, strategy: Any) -> None:
        self.engine, self.strategy = engine, strategy
        self.memory: tuple[int, int | None] | None = None
        self.shape_calls: list[tuple[str, tuple[int, ...]]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.inputs_seen: list[dict[str, bytes]] = []  # the bytes at each input's address, per run
        self.runs = 0
        if not engine.double.api_10_0:
            self.set_device_memory = self._set_device_memory

    def _set_device_memory(self, address: int, size: int) -> None:
        self.memory = (address, size)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "device_memory":  # the property TensorRT had before set_device_memory
            name, value = "memory", (value, None)
        super().__setattr__(name, value)

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        self.shape_calls.append((name, shape))
        low, _, high = self.engine.tensors[name]["profile"]
        if len(shape) != len(low) or not all(lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        if name in self.engine.input_names:
            return Dims(self.shapes.get(name, ()))
        bound: dict[str, int] = {}
        for inp in self.engine.input_names:
            for want, got in zip(self.engine.tensors[inp]["shape"], self.shapes[inp], strict=True):
                if isinstance(want, str):
                    bound[want] = got
        derived = {
            "height": lambda: bound["latent_height"] * SCALE,
            "width": lambda: bound["latent_width"] * SCALE,
            "latent_height": lambda: bound["height"] // SCALE,
            "latent_width": lambda: bound["width"] // SCALE,
        }
        for want in self.engine.tensors[name]["shape"]:
            if isinstance(want, str) and "/" in want:  # a ControlNet residual: latent side / downscale
                base, _, factor = want.partition("/")
                derived[want] = lambda base=base, factor=factor: bound[base] // int(factor)
        shape = [
            d if isinstance(d, int) else bound[d] if d in bound else derived[d]()
            for d in self.engine.tensors[name]["shape"]
        ]
        return Dims(shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        if address % ALIGNMENT:
            return False  # TensorRT: "the address must be aligned to 256 bytes"
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if self.engine.double.fail_execute:
            return False
        self.runs += 1
        seen = {}
        for inp in self.engine.plan["inputs"]:
            nbytes = math.prod(self.shapes[inp["name"]]) * np.dtype(NUMPY[inp["dtype"]]).itemsize
            seen[inp["name"]] = ctypes.string_at(self.addresses[inp["name"]], nbytes)
        self.inputs_seen.append(seen)
        for out in self.engine.plan["outputs"]:
            shape = self.get_tensor_shape(out["name"]).shape
            dtype = np.dtype(NUMPY[out["dtype"]])
            count = int(np.prod(shape))
            raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(self.addresses[out["name"]])
            np.frombuffer(raw, dtype=dtype, count=count)[:] = self.runs
        return True


class _Refitter:
    """Stages named weights (copying their bytes, host or "device" alike: the double runs on the CPU) and applies
    them on refit; fails like TensorRT on unknown names, a wrong dtype or count, missing fused partners."""

    def __init__(self, double: TensorRTDouble, engine: _Engine, logger: Any) -> None:
        if not engine.refittable:
            logger.log(_ILogger.Severity.ERROR, "double: the engine was not built refittable")
            raise TypeError(NULLPTR)
        self.double, self.engine, self.logger = double, engine, logger
        self.staged: dict[str, np.ndarray] = {}

    def get_all_weights(self) -> list[str]:
        return list(self.engine.weights)

    def get_weights_prototype(self, name: str) -> Weights:
        info = self.engine.weights.get(name)
        if info is None:
            return Weights(DataType.FLOAT, 0, -1)
        return Weights(DataType[info["dtype"]], 0, info["count"])

    def set_named_weights(self, name: str, weights: Weights, location: Any = TensorLocation.HOST) -> bool:
        info = self.engine.weights.get(name)
        if info is None or weights.dtype.name != info["dtype"] or weights.size != info["count"]:
            self.logger.log(_ILogger.Severity.ERROR, f"double: set_named_weights rejected {name!r}")
            return False
        data = ctypes.string_at(weights.ptr, weights.nbytes)
        self.staged[name] = np.frombuffer(data, dtype=NUMPY[info["dtype"]]).copy()
        return True

    def get_missing_weights(self) -> list[str]:
        missing = []
        for pair in self.double.fused:
            given = [w in self.staged for w in pair]
            if any(given) and not all(given):
                missing += [w for w, g in zip(pair, given, strict=True) if not g]
        return missing

    def refit_cuda_engine(self) -> bool:
        if self.get_missing_weights():
            self.logger.log(_ILogger.Severity.ERROR, "double: refit with missing weights")
            return False
        if self.double.fail_refit:
            self.logger.log(_ILogger.Severity.ERROR, "double: refit failed while updating weights")
            return False
        self.engine.values.update(self.staged)
        self.double.records.refits.append(dict(self.staged))
        return True

    def refit_cuda_engine_async(self, stream_handle: int) -> bool:
        return self.refit_cuda_engine()


SHIM = '''"""The recording double of tensorrt, for a test's ``sdtrt`` subprocess (written by tests/trt_double.py)."""
import atexit
import importlib.util
import json
import sys

spec = importlib.util.spec_from_file_location("sdtrt_tests_trt_double", {double!r})
double_module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = double_module
spec.loader.exec_module(double_module)
double = double_module.TensorRTDouble()
sys.modules["tensorrt"] = double.module  # what ``import tensorrt`` hands back from here on

from sdtrt.runtime.backends import trt_compat  # noqa: E402

trt_compat._test_device = ("Double GPU", "8.9")


def _record():
    with open({records!r}, "a") as handle:
        handle.write(json.dumps([b["network"] for b in double.records.builds]) + "\\n")


atexit.register(_record)
'''


def write_shim(folder: Path, records: Path) -> Path:
    """A ``tensorrt`` package in ``folder`` that installs this double (the CPU standing in for a GPU) in the process
    that imports it, and appends the networks it built to ``records`` (one JSON list per process) at exit. Put
    ``folder`` first on PYTHONPATH of an ``sdtrt`` subprocess."""
    package = folder / "tensorrt"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(SHIM.format(double=str(Path(__file__).resolve()), records=str(records)))
    return folder
