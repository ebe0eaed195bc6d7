"""A RECORDING TEST DOUBLE of the ``tensorrt`` module. It is not TensorRT and proves nothing about TensorRT.

Tests put ``TensorRTDouble(...).module`` into ``sys.modules["tensorrt"]`` so that sdtrt's build and runtime
orchestration can run on a machine without TensorRT or a GPU. What the double does:

* exposes the names sdtrt calls, spelled as in the TensorRT 10.x Python API, or (``version="11..."``) without the
  names TensorRT 11 removed (precision builder flags, ``device_memory_size``, ``create_execution_context_without_
  device_memory``), or (``legacy=True``) without the 10.1+ names (``device_memory_size_v2``, ``set_device_memory``,
  ``ExecutionContextAllocationStrategy``);
* "parses" an ONNX file by reading its graph inputs/outputs with the ``onnx`` package (output shapes from the
  artifact's manifest), and "builds" a plan that is JSON: the interface, the optimization profile and a made-up
  activation memory size;
* records every call a test wants to check (network flags, builder flags, optimization level, profiles, timing
  cache loads, contexts, device memory, ``set_input_shape`` calls, tensor addresses);
* "executes" by writing the run count into every output buffer (CPU tensors only), through the raw addresses it
  was given, so tests can see that outputs land in the buffers the engine preallocated.

It computes no network, times no kernel, and its plans only load into the double. Whatever a test shows with it
is about sdtrt's bookkeeping, never about TensorRT's results.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = "sdtrt-tensorrt-double"
SCALE = 8  # image side / latent side, as in the tiny model (the double derives VAE output sides with it)
PRECISION_FLAG_NAMES = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS")
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BF16": np.uint16}
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 16: "BF16"}


@dataclass
class Records:
    networks: list[int] = field(default_factory=list)  # create_network flags
    builds: list[dict[str, Any]] = field(default_factory=list)  # one per build_serialized_network
    timing_cache_loads: list[bytes] = field(default_factory=list)
    deserialized: list[str] = field(default_factory=list)  # network names
    contexts: list[Any] = field(default_factory=list)


class TensorRTDouble:
    """One fake ``tensorrt`` module and what was done with it (``records``)."""

    def __init__(
        self,
        version: str = "10.13.0.35",
        memory: dict[str, int] | None = None,
        legacy: bool = False,
        fail_parse: str | None = None,
        fail_build: bool = False,
        fail_execute: bool = False,
    ) -> None:
        self.version = version
        self.memory = memory or {}
        self.legacy = legacy
        self.fail_parse = fail_parse
        self.fail_build = fail_build
        self.fail_execute = fail_execute
        self.records = Records()
        self.module = self._make_module()

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def _make_module(self) -> types.ModuleType:
        module = types.ModuleType("tensorrt")
        module.__dict__["__version__"] = self.version
        module.__dict__["__sdtrt_double__"] = True
        flags = ["REFIT", "TF32", "DEBUG"]
        if self.major < 11:
            flags += list(PRECISION_FLAG_NAMES)
        names = {
            "ILogger": _ILogger,
            "Logger": _Logger,
            "Dims": Dims,
            "DataType": DataType,
            "TensorIOMode": TensorIOMode,
            "MemoryPoolType": enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0}),
            "BuilderFlag": enum.IntEnum("BuilderFlag", {name: i for i, name in enumerate(flags)}),
            "NetworkDefinitionCreationFlag": enum.IntEnum(
                "NetworkDefinitionCreationFlag",
                {"STRONGLY_TYPED": 1} if self.major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
            ),
            "Builder": lambda logger: _Builder(self, logger),
            "OnnxParser": lambda network, logger: _OnnxParser(self, network, logger),
            "Runtime": lambda logger: _Runtime(self, logger),
        }
        if not self.legacy:
            names["ExecutionContextAllocationStrategy"] = AllocationStrategy
        module.__dict__.update(names)
        return module


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


class Dims:
    def __init__(self, shape: list[int] | tuple[int, ...] = ()) -> None:
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
    def __init__(self, data: bytes) -> None:
        self.entries = int(data.decode() or 0)

    def serialize(self) -> bytes:
        return str(self.entries).encode()


class _Config:
    def __init__(self, double: TensorRTDouble) -> None:
        self.double = double
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

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        self.double.records.timing_cache_loads.append(bytes(data))
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        assert self.cache is not None
        return self.cache


class _Builder:
    def __init__(self, double: TensorRTDouble, logger: Any) -> None:
        self.double, self.logger = double, logger

    def create_network(self, flags: int = 0) -> _Network:
        self.double.records.networks.append(flags)
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config(self.double)

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
        }
        return json.dumps(plan).encode()


class _Runtime:
    def __init__(self, double: TensorRTDouble, logger: Any) -> None:
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
        engine_class = _Engine11 if self.double.major >= 11 else _LegacyEngine if self.double.legacy else _Engine10
        return engine_class(self.double, plan)


class _Engine:
    def __init__(self, double: TensorRTDouble, plan: dict[str, Any]) -> None:
        self.double, self.plan = double, plan
        self.tensors = {t["name"]: t for t in plan["inputs"] + plan["outputs"]}
        self.input_names = [t["name"] for t in plan["inputs"]]

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


class _LegacyEngine(_Engine):
    @property
    def device_memory_size(self) -> int:
        return int(self.plan["memory"])

    def create_execution_context(self) -> _Context:
        return self._context(AllocationStrategy.STATIC)

    def create_execution_context_without_device_memory(self) -> _Context:
        return self._context("without_device_memory")


class _Context:
    def __init__(self, engine: _Engine, strategy: Any) -> None:
        self.engine, self.strategy = engine, strategy
        self.memory: tuple[int, int | None] | None = None
        self.shape_calls: list[tuple[str, tuple[int, ...]]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.runs = 0
        if not engine.double.legacy:
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
        shape = [
            d if isinstance(d, int) else bound[d] if d in bound else derived[d]()
            for d in self.engine.tensors[name]["shape"]
        ]
        return Dims(shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if self.engine.double.fail_execute:
            return False
        self.runs += 1
        for out in self.engine.plan["outputs"]:
            shape = self.get_tensor_shape(out["name"]).shape
            dtype = np.dtype(NUMPY[out["dtype"]])
            count = int(np.prod(shape))
            raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(self.addresses[out["name"]])
            np.frombuffer(raw, dtype=dtype, count=count)[:] = self.runs
        return True
