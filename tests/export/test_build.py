"""Engine builds: options, profiles, and the build orchestration.

Most tests run ``build_engines`` against tests/trt_double.py, a RECORDING DOUBLE of the tensorrt module: they check
what sdtrt asks TensorRT for (strongly typed network, no precision flag, one profile with the right min/opt/max
per input, optimization level, timing cache round trip and caches made elsewhere, a TensorRT that cannot
initialise, engine keys, reuse and rebuild, the extras per CUDA version). They say nothing about
what TensorRT builds. Tests marked ``trt`` build real engines and compare them with ONNX Runtime; they run only
where TensorRT and a GPU are installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdtrt.export.build import (
    ProfileRequest,
    TensorRTBuildOptions,
    build_engines,
    check_profile_inside,
    resolve_profile,
)
from sdtrt.runtime.backends import trt_compat
from sdtrt.runtime.errors import BuildError, MissingDependencyError, ShapeError
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.profile import ShapeProfile
from sdtrt.runtime.specs import ModelInfo, component_specs, shape_ranges

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
COMPONENTS = ("text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder")  # the tiny artifacts'
N = len(COMPONENTS)
DOUBLE_GPU = ("Double GPU", "8.9")


import sdtrt_tests_trt_double as trt_double  # noqa: E402  (registered by conftest.py)


# -- options and profiles (no TensorRT involved) -------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"opt_level": 6}, "from 0 to 5, found 6"),
        ({"opt_level": True}, "from 0 to 5, found True"),
        ({"workspace_gib": 0}, "must be > 0 GiB"),
        ({"components": ("unet", "clip")}, r"components must be distinct names from .* found \['unet', 'clip'\]"),
        ({"components": ()}, "components must be distinct"),
    ],
)
def test_build_options_are_validated(kwargs, message):
    with pytest.raises(BuildError, match=message):
        TensorRTBuildOptions(**kwargs)


def test_timing_cache_must_be_a_file(tmp_path):
    with pytest.raises(BuildError, match="must be a file path, found a folder"):
        TensorRTBuildOptions(timing_cache=tmp_path)
    assert TensorRTBuildOptions(timing_cache=str(tmp_path / "c.cache")).timing_cache == tmp_path / "c.cache"


ARTIFACT = ShapeProfile.square(256, 512, 1024, max_batch=4)


def test_profile_requests_map_onto_shape_profiles():
    assert resolve_profile(ProfileRequest(), ARTIFACT) is None
    static = resolve_profile(ProfileRequest(static_size=(512, 768), batch=2), ARTIFACT)
    assert static == ShapeProfile(2, 2, 2, 512, 512, 512, 768, 768, 768)
    dynamic = resolve_profile(ProfileRequest(dynamic=True, min_size=(512, 512), max_size=(768, 768)), ARTIFACT)
    assert dynamic is not None and dynamic.id == "b1-1-4_h512-512-768_w512-512-768"
    batches = resolve_profile(ProfileRequest(min_batch=2, max_batch=3), ARTIFACT)
    assert batches is not None and (batches.min_batch, batches.opt_batch, batches.max_batch) == (2, 2, 3)
    assert batches.min_height == 256 and batches.max_height == 1024  # sizes stay the artifact's


def test_conflicting_profile_requests_are_refused():
    with pytest.raises(ShapeError, match="either a static size"):
        ProfileRequest(static_size=(512, 512), min_size=(256, 256))
    with pytest.raises(ShapeError, match="either --batch N or"):
        ProfileRequest(batch=1, max_batch=4)


def test_profile_must_lie_inside_the_artifact_profile():
    model = ModelInfo()
    check_profile_inside(ShapeProfile.static(512, 512, 4), ARTIFACT, model)
    with pytest.raises(ShapeError, match=r"height 1280..1280 \(the artifact has 256..1024\).*re-export"):
        check_profile_inside(ShapeProfile.static(1280, 512), ARTIFACT, model)
    with pytest.raises(ShapeError, match=r"batch 1..8 \(the artifact has 1..4\)"):
        check_profile_inside(ShapeProfile.square(256, 512, 512, max_batch=8), ARTIFACT, model)
    with pytest.raises(ShapeError, match="multiples of 64 pixels"):
        check_profile_inside(ShapeProfile.static(520, 520), ARTIFACT, model)


# -- orchestration on the recording double -----------------------------------------------------------------------
def test_build_asks_for_strongly_typed_networks_without_precision_flags(use_double, tiny_fp16, tmp_path):
    double = use_double()
    profile = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)
    manifest = build_engines(tiny_fp16, tmp_path / "E", profile, TensorRTBuildOptions(opt_level=2))
    records = double.records
    strongly_typed = 1 << int(double.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert records.networks == [strongly_typed] * N
    assert [b["network"] for b in records.builds] == list(COMPONENTS)
    assert all(b["flags"] == [] and b["opt_level"] == 2 and b["pool_limits"] == {} for b in records.builds)
    source = read_manifest(tiny_fp16)
    for build in records.builds:
        name = build["network"]
        assert len(build["profiles"]) == 1
        expected = shape_ranges(component_specs(source.model)[name], profile, source.model)
        assert build["profiles"][0] == {k: [list(s) for s in v] for k, v in expected.items()}
    unet = records.builds[1]["profiles"][0]
    assert unet["sample"] == [[1, 4, 8, 8], [2, 4, 16, 16], [4, 4, 32, 32]]  # CFG doubles the UNet batch
    assert unet["encoder_hidden_states"][2] == [4, 77, 32]
    assert manifest.kind == "tensorrt" and manifest.profile == profile
    assert list(manifest.components) == list(COMPONENTS)


def test_refit_and_workspace_are_the_only_flags_set(use_double, tiny_fp16, tmp_path):
    double = use_double()
    options = TensorRTBuildOptions(refittable=True, workspace_gib=1.5, components=("unet",))
    build_engines(tiny_fp16, tmp_path / "E", None, options)
    assert built(double) == ["unet", "unet_shallow"]  # the step-cache UNets are built together
    for build in double.records.builds:
        assert build["flags"] == ["REFIT"]  # any new weights later: neither REFIT_IDENTICAL nor STRIP_PLAN
        assert build["pool_limits"] == {"WORKSPACE": int(1.5 * 2**30)}
        assert not set(build["flags"]) & set(trt_double.PRECISION_FLAG_NAMES)


def test_tensorrt_11_networks_are_strongly_typed_without_the_flag(use_double, tiny_fp16, tmp_path):
    double = use_double(version="11.4.0.106")
    assert not hasattr(double.module.BuilderFlag, "FP16")  # as in TensorRT 11
    manifest = build_engines(tiny_fp16, tmp_path / "E", None, TensorRTBuildOptions(components=("unet",)))
    assert double.records.networks == [0, 0]  # unet and unet_shallow
    assert int(double.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0  # deprecated, always on in 11
    assert manifest.components["unet"].extra["key"]["tensorrt"] == "11.4.0.106"


def test_engine_folder_is_complete_and_keyed(use_double, tiny_fp16, tmp_path):
    use_double(memory={"unet": 4096})
    out = tmp_path / "E"
    build_engines(tiny_fp16, out, None, TensorRTBuildOptions(opt_level=4))
    manifest = read_manifest(out)
    source = read_manifest(tiny_fp16)
    assert manifest.kind == "tensorrt" and manifest.profile == source.profile
    assert manifest.versions["tensorrt"] == "10.13.0.35"
    assert (out / "tokenizer.json").read_bytes() == (tiny_fp16 / "tokenizer.json").read_bytes()
    assert (out / "scheduler_config.json").is_file()
    unet = manifest.components["unet"]
    assert unet.file == "unet.plan" and (out / "unet.plan").is_file() and unet.precision == "fp16"
    assert unet.inputs == source.components["unet"].inputs
    assert unet.extra["key"] == {
        "onnx_sha256": source.components["unet"].sha256,
        "onnx_data_sha256": None,
        "precision": "fp16",
        "profile": source.profile.id,
        "tensorrt": "10.13.0.35",
        "gpu": "Double GPU",
        "compute_capability": "8.9",
        "builder": {"opt_level": 4, "refittable": False, "workspace_gib": None},
    }
    assert unet.extra["device_memory_size"] == 4096  # device_memory_size_v2, not the older figure
    assert unet.extra["build_seconds"] >= 0 and unet.extra["peak_device_memory"] is None  # None: no CUDA here
    assert unet.extra["artifacts"] == str(tiny_fp16.resolve())


def cache_bytes(entries, version="10.13.0.35", capability="8.9"):
    """A timing cache as the double serializes it (header: TensorRT version and compute capability)."""
    return f"{trt_double.CACHE_MAGIC}|{version}|{capability}|{entries}".encode()


def test_timing_cache_is_loaded_then_saved(use_double, tiny_fp16, tmp_path):
    double = use_double()
    cache = tmp_path / "timing.cache"
    options = TensorRTBuildOptions(timing_cache=cache, components=("text_encoder", "vae_decoder"))
    build_engines(tiny_fp16, tmp_path / "E", None, options)
    assert double.records.timing_cache_loads == [b"", cache_bytes(1)]  # fresh, then what the first build saved
    assert cache.read_bytes() == cache_bytes(2)
    build_engines(tiny_fp16, tmp_path / "F", None, options)
    assert double.records.timing_cache_loads[2] == cache_bytes(2)


@pytest.mark.parametrize("theirs", [cache_bytes(7, capability="9.0"), cache_bytes(7, version="10.9.0.34"), b"junk"])
def test_timing_cache_made_elsewhere_is_left_alone(use_double, tiny_fp16, tmp_path, caplog, theirs):
    """Another GPU or TensorRT (rejected by the header), or not a cache at all: never overwritten; a sibling is."""
    double = use_double()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(theirs)
    options = TensorRTBuildOptions(timing_cache=cache, components=("vae_decoder",))
    with caplog.at_level(logging.WARNING, logger="sdtrt.export.trt_builder"):
        build_engines(tiny_fp16, tmp_path / "E", None, options)
    assert cache.read_bytes() == theirs
    sibling = tmp_path / "timing.trt10.13.0.35-cc8.9.cache"
    assert sibling.read_bytes() == cache_bytes(1)
    assert "was made by another TensorRT version or GPU" in caplog.text
    assert f"saved to {sibling}; {cache} is left as it is" in caplog.text
    build_engines(tiny_fp16, tmp_path / "F", None, options)  # the next build finds and extends the sibling
    assert double.records.timing_cache_loads[-1] == cache_bytes(1) and sibling.read_bytes() == cache_bytes(2)
    assert cache.read_bytes() == theirs


def test_timing_cache_tensorrt_cannot_create_is_logged_and_skipped(use_double, tiny_fp16, tmp_path, caplog):
    use_double(fail_timing_cache=True)
    cache = tmp_path / "timing.cache"
    with caplog.at_level(logging.WARNING, logger="sdtrt.export.trt_builder"):
        build_engines(tiny_fp16, tmp_path / "E", None, TensorRTBuildOptions(timing_cache=cache, components=("unet",)))
    assert (tmp_path / "E" / "unet.plan").is_file() and not cache.exists()
    assert "could not create a timing cache (create_timing_cache returned None" in caplog.text
    assert "building without one" in caplog.text


def test_tensorrt_that_cannot_initialise_names_the_likely_cause(use_double, tiny_fp16, tmp_path):
    use_double(fail_init=True)
    with pytest.raises(BuildError) as caught:
        build_engines(tiny_fp16, tmp_path / "E", None, TensorRTBuildOptions(components=("unet",)))
    message = str(caught.value)
    assert "TensorRT could not initialise: trt.Builder(logger) failed (pybind11::init(): factory function" in message
    assert "double: CUDA initialization failure with error: 35" in message  # the logger's warning
    assert "driver is too old for the CUDA version" in message and 'pip install "sdtrt[trt-cu' in message


def test_logger_keeps_the_first_errors_and_the_last(use_double):
    use_double()
    logger = trt_compat.logger()
    trt_compat.take_errors()
    logger.log(logger.Severity.ERROR, "the cause")
    for i in range(50):
        logger.log(logger.Severity.ERROR, f"consequence {i}")
    errors = trt_compat.take_errors()
    first, last = trt_compat.FIRST_ERRORS, trt_compat.LAST_ERRORS
    assert errors[0] == "the cause" and errors[first - 1] == f"consequence {first - 2}"
    assert errors[first] == f"({51 - first - last} more)"
    assert errors[-1] == "consequence 49" and len(errors) == first + 1 + last
    assert trt_compat.take_errors() == []


def test_more_than_eight_dimensions_is_a_build_error(use_double):
    """Dims holds at most 8 dimensions (the double raises ValueError past that, as a wrong shape would)."""
    from sdtrt.export.trt_builder import add_profile

    double = use_double()
    builder = double.module.Builder(trt_compat.logger())
    network = builder.create_network(0)
    network.inputs = [trt_double._Tensor("x", "FLOAT", ["a"] * 9)]
    shape = (1,) * 9
    with pytest.raises(BuildError, match=r"at most 8 dimensions, but inputs \{'x': 9\}"):
        add_profile(builder, network, builder.create_builder_config(), {"x": (shape, shape, shape)}, "x.onnx")


def test_matching_key_is_reused_and_mismatching_key_rebuilt(use_double, tiny_fp16, tmp_path, caplog):
    double = use_double()
    out = tmp_path / "E"
    first = build_engines(tiny_fp16, out, None, TensorRTBuildOptions())
    assert len(double.records.builds) == N
    with caplog.at_level(logging.INFO, logger="sdtrt.export.build"):
        again = build_engines(tiny_fp16, out, None, TensorRTBuildOptions())
    assert len(double.records.builds) == N  # nothing rebuilt
    assert again.components == first.components
    assert "reusing unet.plan: its build key matches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdtrt.export.build"):
        build_engines(tiny_fp16, out, None, TensorRTBuildOptions(opt_level=5, components=("unet",)))
    assert [b["network"] for b in double.records.builds[N:]] == ["unet", "unet_shallow"]  # built together
    assert "building the unet engine: the build key changed: builder" in caplog.text
    assert set(read_manifest(out).components) == set(COMPONENTS)  # the other engines stay


def test_damaged_plan_and_other_tensorrt_are_rebuilt(use_double, tiny_fp16, tmp_path, caplog):
    use_double()
    out = tmp_path / "E"
    build_engines(tiny_fp16, out, None, TensorRTBuildOptions(components=("unet", "vae_decoder")))
    with open(out / "vae_decoder.plan", "ab") as handle:
        handle.write(b" ")
    double = use_double()
    with caplog.at_level(logging.INFO, logger="sdtrt.export.build"):
        build_engines(tiny_fp16, out, None, TensorRTBuildOptions(components=("unet", "vae_decoder")))
    assert [b["network"] for b in double.records.builds] == ["vae_decoder"]
    assert "vae_decoder.plan does not match the manifest's sha256" in caplog.text
    double = use_double(version="10.14.1.48")
    build_engines(tiny_fp16, out, None, TensorRTBuildOptions(components=("unet", "vae_decoder")))
    assert [b["network"] for b in double.records.builds] == ["unet", "unet_shallow", "vae_decoder"]


def test_new_profile_drops_engines_built_for_the_old_one(use_double, tiny_fp16, tmp_path):
    use_double()
    out = tmp_path / "E"
    build_engines(tiny_fp16, out, None, TensorRTBuildOptions())
    build_engines(tiny_fp16, out, ShapeProfile.static(128, 128), TensorRTBuildOptions(components=("unet",)))
    manifest = read_manifest(out)
    assert list(manifest.components) == ["unet", "unet_shallow"] and manifest.profile.id == "b1_h128_w128"
    assert not (out / "vae_decoder.plan").exists()


def test_parser_errors_are_listed(use_double, tiny_fp16, tmp_path):
    use_double(fail_parse="In node 3 (Attention): unsupported operator")
    with pytest.raises(BuildError, match=r"ONNX parser could not read text_encoder.onnx .*unsupported operator"):
        build_engines(tiny_fp16, tmp_path / "E", None, TensorRTBuildOptions())


def test_failed_build_names_the_call_and_the_tensorrt_error(use_double, tiny_fp16, tmp_path):
    use_double(fail_build=True)
    with pytest.raises(BuildError, match=r"build_serialized_network\): double: out of memory"):
        build_engines(tiny_fp16, tmp_path / "E", None, TensorRTBuildOptions(components=("unet",)))
    assert not (tmp_path / "E" / "unet.plan").exists()


def test_output_folder_that_is_not_an_engine_folder_is_refused(use_double, tiny_fp16, tmp_path):
    use_double()
    (tmp_path / "E").mkdir()
    (tmp_path / "E" / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not an sdtrt engine folder; refusing"):
        build_engines(tiny_fp16, tmp_path / "E", None, TensorRTBuildOptions())
    shutil.copytree(tiny_fp16, tmp_path / "A")
    with pytest.raises(BuildError, match="is an ONNX artifact folder"):
        build_engines(tiny_fp16, tmp_path / "A", None, TensorRTBuildOptions())
    with pytest.raises(BuildError, match="is the artifact folder itself"):
        build_engines(tiny_fp16, tiny_fp16, None, TensorRTBuildOptions())


def test_requested_profile_outside_the_artifact_is_refused(use_double, tiny_fp16, tmp_path):
    use_double()
    with pytest.raises(ShapeError, match="outside the artifact's profile"):
        build_engines(tiny_fp16, tmp_path / "E", ShapeProfile.static(512, 512), TensorRTBuildOptions())


def test_missing_tensorrt_names_the_install_command(monkeypatch, tiny_fp16, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    monkeypatch.setattr("torch.version.cuda", "12.8")
    with pytest.raises(MissingDependencyError, match=r'pip install "sdtrt\[trt-cu12\]".*NVIDIA\'s package index'):
        build_engines(tiny_fp16, tmp_path / "E")


@pytest.mark.parametrize(
    "cuda, extra, hint",
    [
        ("12.8", "trt-cu12", 'pip install "sdtrt[trt-cu12]" (TensorRT for CUDA 12'),
        ("13.0", "trt-cu13", 'pip install "sdtrt[trt-cu13]" (TensorRT for CUDA 13'),
        ("11.8", None, '"sdtrt[trt-cu12]" or "sdtrt[trt-cu13]", the one matching'),
        (None, None, "this torch is a CPU-only build, which TensorRT cannot use"),
    ],
)
def test_the_tensorrt_extra_follows_torchs_cuda(monkeypatch, cuda, extra, hint):
    monkeypatch.setattr("torch.version.cuda", cuda)
    assert trt_compat.matching_extra(cuda) == extra
    assert hint in trt_compat.install_hint()
    advice = trt_compat.extra_advice()
    assert (f'pip install "sdtrt[{extra}]"' in advice) if extra else advice.startswith("none ")


def test_extras_offer_a_tensorrt_wheel_per_cuda_version():
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert extras["trt-cu12"][0] == "tensorrt-cu12>=10.0" and extras["trt-cu13"][0] == "tensorrt-cu13>=10.0"
    assert extras["trt"][0] == "tensorrt>=10.0"  # the metapackage: the CUDA 13 build
    assert not any(r.startswith("polygraphy") for r in extras["export"])  # nothing in export uses it
    assert all(any(r.startswith("polygraphy") for r in extras[e]) for e in ("trt", "trt-cu12", "trt-cu13"))


def test_no_gpu_is_one_clear_error(use_double, monkeypatch, tiny_fp16, tmp_path):
    use_double()
    monkeypatch.setattr(trt_compat, "_test_device", None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(BuildError, match="TensorRT needs an NVIDIA GPU, and torch sees none"):
        build_engines(tiny_fp16, tmp_path / "E")


# -- the command line --------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_sdtrt_build_without_tensorrt_explains_itself(tiny_fp16, tmp_path):
    result = subprocess.run(
        [SDTRT, "build", str(tiny_fp16), "--out", str(tmp_path / "E"), "--static", "128", "--batch", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "building TensorRT engines needs the Python module 'tensorrt'" in result.stderr
    assert 'pip install "sdtrt[trt-cu' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "E").exists()


def test_sdtrt_build_refuses_a_bad_profile_before_anything_else(tiny_fp16, tmp_path):
    result = subprocess.run(
        [SDTRT, "build", str(tiny_fp16), "--out", str(tmp_path / "E"), "--static", "128", "--max-size", "256"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "either a static size" in result.stderr


def test_sdtrt_doctor_runs_with_what_is_installed():
    import torch

    result = subprocess.run([SDTRT, "doctor"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for word in ("torch", "tensorrt", "onnxruntime", "backends:", "  onnxruntime", "  torch", "  tensorrt"):
        assert word in result.stdout
    extra_line = next(line for line in result.stdout.splitlines() if line.startswith("trt extra"))
    if torch.version.cuda is None:
        assert "none can run here: this torch is a CPU-only build" in extra_line
    else:
        assert "trt-cu" in extra_line or "none fits" in extra_line


# -- real TensorRT (run by users who have it) ---------------------------------------------------------------------
@pytest.mark.trt
def test_tiny_engines_match_onnxruntime(tiny_fp16, tmp_path):
    import torch

    from sdtrt.export.onnx_export import sample_inputs
    from sdtrt.runtime.backends import onnxruntime as ort_backend
    from sdtrt.runtime.backends import tensorrt as trt_backend

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128)
    out = tmp_path / "engines"
    manifest = build_engines(tiny_fp16, out, profile, TensorRTBuildOptions(opt_level=1))
    source = read_manifest(tiny_fp16)
    specs = component_specs(source.model)
    trt_engines = trt_backend.open_engines(out, manifest, list(COMPONENTS), "cuda")
    ort_engines = ort_backend.open_engines(tiny_fp16, source, list(COMPONENTS), "cpu")
    for name in COMPONENTS:
        tensors = sample_inputs(specs[name], source.model, profile, "fp16")
        feeds = dict(zip([t.name for t in specs[name].inputs], tensors, strict=True))
        expected = ort_engines[name].infer(feeds)
        found = trt_engines[name].infer({k: v.cuda() for k, v in feeds.items()})
        torch.cuda.synchronize()
        for key, want in expected.items():
            got = found[key].float().cpu()
            rel = float((got - want.float()).norm() / want.float().norm().clamp_min(1e-12))
            assert rel <= 1e-2, (name, key, rel)
        assert json.loads((out / "manifest.json").read_text())["components"][name]["extra"]["peak_device_memory"] > 0


# -- SDXL on the recording double ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_xl_fp16(tmp_path_factory):
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.presets import load_preset

    out = tmp_path_factory.mktemp("xl") / "fp16"
    profile = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256, max_prompt_windows=3)
    # an artifact without the shallow UNet (--no-step-cache); test_sdxl_step_cache_builds_the_shallow_unet has it
    options = ExportOptions(profile=profile, precision="fp16", step_cache=False)
    export_artifacts(load_preset("tiny-xl"), out, options)
    return out


def test_sdxl_builds_both_encoders_and_profiles_the_extra_unet_inputs(use_double, tiny_xl_fp16, tmp_path):
    double = use_double(version="11.4.0.106")
    out = tmp_path / "E"
    manifest = build_engines(tiny_xl_fp16, out, None, TensorRTBuildOptions())
    builds = {b["network"]: b["profiles"][0] for b in double.records.builds}
    assert list(builds) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    # prompt + negative, each up to 3 windows, up to 2 images: 1 .. 2 x 2 x 3 rows of 77 ids
    assert builds["text_encoder_2"]["input_ids"] == [[1, 77], [2, 77], [12, 77]]
    unet = builds["unet"]
    assert unet["text_embeds"] == [[1, 24], [2, 24], [4, 24]]  # CFG doubles the UNet batch
    assert unet["time_ids"] == [[1, 6], [2, 6], [4, 6]]
    assert unet["encoder_hidden_states"] == [[1, 77, 64], [2, 77, 64], [4, 231, 64]]
    source = read_manifest(tiny_xl_fp16)
    assert manifest.tokenizer_2 == "tokenizer_2.json"
    assert (out / "tokenizer_2.json").read_bytes() == (tiny_xl_fp16 / "tokenizer_2.json").read_bytes()
    keys = {name: entry.extra["key"] for name, entry in manifest.components.items()}
    assert keys["text_encoder_2"]["onnx_sha256"] == source.components["text_encoder_2"].sha256
    assert keys["unet"]["precision"] == "fp16" and keys["vae_decoder"]["precision"] == "fp32"  # VAE kept fp32
    assert read_manifest(out).model.family == "sdxl"


# -- ControlNets on the recording double --------------------------------------------------------------------------
CONTROL_PROFILE = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)


def test_controlnets_are_built_under_the_unets_profile(use_double, tiny_control_fp32, tmp_path):
    """Every ControlNet of the artifact is built by default; where it takes the UNet's inputs its ranges are the
    UNet's, the hint follows the image size of the same profile, and the manifest keeps the ControlNet's name."""
    double = use_double(memory={"controlnet_edges": 9000})
    out = tmp_path / "E"
    manifest = build_engines(tiny_control_fp32, out, CONTROL_PROFILE, TensorRTBuildOptions())
    builds = {b["network"]: b["profiles"][0] for b in double.records.builds}
    assert list(builds) == [*COMPONENTS, "controlnet_depth", "controlnet_edges"]
    unet = builds["unet"]
    for name in ("controlnet_depth", "controlnet_edges"):
        control = builds[name]
        assert set(control) == {"sample", "timestep", "encoder_hidden_states", "controlnet_cond"}
        for shared in ("sample", "timestep", "encoder_hidden_states"):
            assert control[shared] == unet[shared], (name, shared)
        # the hint is an image at the profile's sizes, one per UNet row (CFG doubles it, like the UNet batch)
        assert control["controlnet_cond"] == [[1, 3, 64, 64], [2, 3, 128, 128], [4, 3, 256, 256]]
    # the residual inputs of the UNet follow the latent size, halved where the model downsampled
    assert unet["control_down_0"] == [[1, 32, 8, 8], [2, 32, 16, 16], [4, 32, 32, 32]]
    assert unet["control_mid"] == [[1, 64, 4, 4], [2, 64, 8, 8], [4, 64, 16, 16]]
    source = read_manifest(tiny_control_fp32)
    assert list(manifest.components) == list(read_manifest(out).components)
    assert manifest.controlnets == {"depth": "controlnet_depth", "edges": "controlnet_edges"}
    edges = manifest.components["controlnet_edges"]
    assert edges.file == "controlnet_edges.plan" and (out / edges.file).is_file()
    assert edges.extra["controlnet"] == source.components["controlnet_edges"].extra["controlnet"]
    assert edges.extra["controlnet"]["name"] == "edges"
    assert edges.extra["key"]["onnx_sha256"] == source.components["controlnet_edges"].sha256
    assert edges.extra["device_memory_size"] == 9000
    outputs = {t.name: t.shape for t in edges.outputs}
    assert outputs["control_down_2"] == ("unet_batch", 32, "latent_height/2", "latent_width/2")
    assert [t.name for t in edges.outputs] == [t.name for t in manifest.components["unet"].inputs][3:]


def test_named_controlnets_and_unknown_ones(use_double, tiny_control_fp32, tmp_path):
    double = use_double()
    options = TensorRTBuildOptions(components=("unet", "controlnet_edges"))
    manifest = build_engines(tiny_control_fp32, tmp_path / "E", CONTROL_PROFILE, options)
    assert [b["network"] for b in double.records.builds] == ["unet", "unet_shallow", "controlnet_edges"]
    assert manifest.controlnets == {"edges": "controlnet_edges"}
    with pytest.raises(BuildError, match=r"has no controlnet_canny \(its ControlNets: controlnet_depth, controlnet_"):
        build_engines(
            tiny_control_fp32, tmp_path / "F", None, TensorRTBuildOptions(components=("unet", "controlnet_canny"))
        )
    with pytest.raises(BuildError, match="components must be distinct names from .* or controlnet_<name>"):
        TensorRTBuildOptions(components=("controlnet_",))


def built(double) -> list[str]:
    return [b["network"] for b in double.records.builds]


def test_adding_a_controlnet_builds_only_the_controlnet(use_double, tiny_fp32, tiny_controlnets, tmp_path):
    """A ControlNet added to the artifact later: the next build into the same folder builds it alone and keeps the
    UNet and the rest (same ONNX files, same profile); a changed ONNX file or profile rebuilds as before."""
    from sdtrt.export.controlnet import ControlNetArg, add_controlnets

    artifact, out = tmp_path / "A", tmp_path / "E"
    shutil.copytree(tiny_fp32, artifact)
    double = use_double()
    build_engines(artifact, out, CONTROL_PROFILE)
    assert built(double) == list(COMPONENTS)
    unet_plan = (out / "unet.plan").read_bytes()
    add_controlnets(artifact, [ControlNetArg(str(tiny_controlnets["edges"][0]), "edges")])
    build_engines(artifact, out, CONTROL_PROFILE)
    assert built(double)[N:] == ["controlnet_edges"]  # one more build: the UNet was kept
    assert (out / "unet.plan").read_bytes() == unet_plan
    add_controlnets(artifact, [ControlNetArg(str(tiny_controlnets["depth"][0]), "depth")])
    manifest = build_engines(artifact, out, CONTROL_PROFILE)
    assert built(double)[N + 1 :] == ["controlnet_depth"]
    assert manifest.controlnets == {"depth": "controlnet_depth", "edges": "controlnet_edges"}
    # a re-exported UNet (other ONNX bytes, another sha256 in the artifact's manifest) is built again, alone
    source = json.loads((artifact / "manifest.json").read_text())
    import onnx

    graph = onnx.load(str(artifact / "unet.onnx"))
    graph.doc_string = "exported again"  # other bytes, the same network
    onnx.save(graph, str(artifact / "unet.onnx"))
    source["components"]["unet"]["sha256"] = onnx_sha256(artifact / "unet.onnx")
    (artifact / "manifest.json").write_text(json.dumps(source))
    build_engines(artifact, out, CONTROL_PROFILE)
    assert built(double)[N + 2 :] == ["unet"]
    # another profile: everything again
    build_engines(artifact, out, ShapeProfile(1, 1, 1, 64, 64, 128, 64, 64, 128))
    assert sorted(built(double)[N + 3 :]) == sorted([*COMPONENTS, "controlnet_depth", "controlnet_edges"])


def onnx_sha256(path: Path) -> str:
    from sdtrt.runtime.files import sha256_file

    return sha256_file(path)


def test_engine_of_an_onnx_file_the_artifact_no_longer_has_is_removed(use_double, tiny_control_fp32, tmp_path):
    """Engines not asked for are kept only when the artifact still has the very ONNX file they were built from."""
    use_double()
    artifact, out = tmp_path / "A", tmp_path / "E"
    shutil.copytree(tiny_control_fp32, artifact)
    build_engines(artifact, out, CONTROL_PROFILE, TensorRTBuildOptions(components=("unet", "controlnet_edges")))
    source = json.loads((artifact / "manifest.json").read_text())
    del source["components"]["controlnet_edges"]
    (artifact / "manifest.json").write_text(json.dumps(source))
    manifest = build_engines(artifact, out, CONTROL_PROFILE, TensorRTBuildOptions(components=("unet",)))
    assert set(manifest.components) == {"unet", "unet_shallow"} and not (out / "controlnet_edges.plan").exists()


def test_sdtrt_build_says_which_engines_it_kept(tiny_fp32, tiny_controlnets, tmp_path):
    """The CLI end to end (tensorrt is the double in the subprocess): the default builds everything the artifact
    has; after `sdtrt export CONTROLNET --into`, `sdtrt build` into the same folder (its shapes kept) builds the
    ControlNet alone and says so."""
    artifact, out, records = tmp_path / "A", tmp_path / "E", tmp_path / "builds.jsonl"
    shutil.copytree(tiny_fp32, artifact)
    shim = trt_double.write_shim(tmp_path / "shim", records)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}

    def sdtrt(*args):
        done = subprocess.run([SDTRT, *args], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        return done

    first = sdtrt("build", str(artifact), "--out", str(out), "--static", "128", "--batch", "1")
    assert "kept" not in first.stdout and "built in" in first.stdout
    sdtrt("export", f"edges={tiny_controlnets['edges'][0]}", "--into", str(artifact))
    again = sdtrt("build", str(artifact), "--out", str(out))  # no shapes asked: the engine folder's are kept
    assert "keeping the profile of the engines in" in again.stderr
    assert read_manifest(out).profile == ShapeProfile.static(128, 128, 1)
    builds = [json.loads(line) for line in records.read_text().splitlines()]
    assert builds == [list(COMPONENTS), ["controlnet_edges"]]
    assert "building controlnet_edges ..." in again.stderr and "building unet" not in again.stderr
    lines = {line.split()[0]: line for line in again.stdout.splitlines()[2:] if line.strip()}
    assert "built in" in lines["controlnet_edges.plan"] and "kept (built earlier in" in lines["unet.plan"]
    assert (
        "kept 5 engine(s) built earlier from the same ONNX files and profile: text_encoder, unet, unet_shallow, "
        "vae_decoder, vae_encoder" in again.stdout
    )


def test_existing_profile_is_kept_only_inside_the_artifacts(use_double, tiny_fp16, tmp_path):
    from sdtrt.export.build import existing_profile

    use_double()
    out = tmp_path / "E"
    assert existing_profile(out, ARTIFACT) is None  # nothing there yet
    build_engines(tiny_fp16, out, CONTROL_PROFILE, TensorRTBuildOptions(components=("unet",)))
    assert existing_profile(out, read_manifest(tiny_fp16).profile) == CONTROL_PROFILE
    narrower = ShapeProfile.square(64, 128, 128, max_batch=4)  # an artifact re-exported for smaller images
    assert existing_profile(out, narrower) is None
    assert existing_profile(tiny_fp16, ARTIFACT) is None  # an ONNX artifact has no engine profile


# -- step caching on the recording double -------------------------------------------------------------------------
def test_shallow_unet_is_built_under_the_unets_profile(use_double, tiny_fp16, tmp_path):
    """The shallow UNet shares the UNet's inputs and their ranges; its cached feature's ranges follow the latent
    size (divided by the feature's downscale); the UNet engine keeps its second output, the manifest the model's
    cache fields and the shallow UNet's own weight map."""
    double = use_double(memory={"unet": 7000, "unet_shallow": 2500})
    out = tmp_path / "E"
    manifest = build_engines(tiny_fp16, out, CONTROL_PROFILE, TensorRTBuildOptions(refittable=True))
    source = read_manifest(tiny_fp16)
    builds = {b["network"]: b for b in double.records.builds}
    assert builds["unet_shallow"]["flags"] == ["REFIT"]  # the UNet's builder options
    unet, shallow = builds["unet"]["profiles"][0], builds["unet_shallow"]["profiles"][0]
    assert set(shallow) == {t.name for t in source.components["unet_shallow"].inputs}
    for name in set(shallow) - {"cache_feature"}:
        assert shallow[name] == unet[name], name
    channels, factor = source.model.cache_feature
    # (min, opt, max) of [unet_batch, C, latent_height/k, latent_width/k]: CFG doubles the batch, latents are 1/8
    expected = [[rows, channels, side // factor, side // factor] for rows, side in ((1, 8), (2, 16), (4, 32))]
    assert shallow["cache_feature"] == expected
    assert read_manifest(out).model == source.model and manifest.model.cache_branch == source.model.cache_branch >= 0
    plans = {name: json.loads((out / f"{name}.plan").read_text()) for name in ("unet", "unet_shallow")}
    assert [t["name"] for t in plans["unet"]["outputs"]] == ["noise_pred", "cache_feature"]
    assert [t.name for t in manifest.components["unet"].outputs] == ["noise_pred", "cache_feature"]
    entry = manifest.components["unet_shallow"]
    assert entry.file == "unet_shallow.plan" and entry.inputs == source.components["unet_shallow"].inputs
    assert entry.extra["key"]["onnx_sha256"] == source.components["unet_shallow"].sha256
    assert entry.extra["device_memory_size"] == 2500
    assert entry.extra["lora_map"] == source.components["unet_shallow"].extra["lora_map"]
    assert entry.extra["weights"] == source.components["unet_shallow"].extra["weights"]  # what a LoRA refits
    assert entry.extra["lora_map"] != manifest.components["unet"].extra["lora_map"]


def test_naming_the_unet_builds_the_shallow_unet_with_it(use_double, tiny_fp16, tiny_xl_fp16, tmp_path):
    double = use_double()
    manifest = build_engines(tiny_fp16, tmp_path / "E", None, TensorRTBuildOptions(components=("unet",)))
    assert built(double) == ["unet", "unet_shallow"] and list(manifest.components) == ["unet", "unet_shallow"]
    build_engines(tiny_fp16, tmp_path / "F", None, TensorRTBuildOptions(components=("vae_decoder", "unet")))
    assert built(double)[2:] == ["vae_decoder", "unet", "unet_shallow"]
    build_engines(tiny_fp16, tmp_path / "G", None, TensorRTBuildOptions(components=("unet_shallow",)))
    assert built(double)[5:] == ["unet_shallow"]  # the shallow engine alone may be rebuilt
    build_engines(tiny_xl_fp16, tmp_path / "H", None, TensorRTBuildOptions(components=("unet",)))
    assert built(double)[6:] == ["unet"]  # no shallow UNet in this artifact


def test_sdtrt_build_components_unet_builds_both_unets(tiny_fp32, tmp_path):
    """The CLI end to end (the double in the subprocess): --components unet builds the shallow UNet with it."""
    out, records = tmp_path / "E", tmp_path / "builds.jsonl"
    shim = trt_double.write_shim(tmp_path / "shim", records)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    args = ["build", str(tiny_fp32), "--out", str(out), "--static", "128", "--batch", "1", "--components", "unet"]
    done = subprocess.run([SDTRT, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in records.read_text().splitlines()] == [["unet", "unet_shallow"]]
    assert "unet_shallow.plan" in done.stdout
    assert set(read_manifest(out).components) == {"unet", "unet_shallow"}


def test_sdxl_step_cache_builds_the_shallow_unet(use_double, tmp_path):
    """SDXL's outer blocks have no cross-attention: its shallow UNet takes no text context, but the extra inputs."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.presets import load_preset

    profile = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)
    export_artifacts(load_preset("tiny-xl"), tmp_path / "xl", ExportOptions(profile=profile, precision="fp16"))
    double = use_double()
    manifest = build_engines(tmp_path / "xl", tmp_path / "E", None, TensorRTBuildOptions(components=("unet",)))
    assert built(double) == ["unet", "unet_shallow"]
    shallow = double.records.builds[1]["profiles"][0]
    assert shallow["text_embeds"] == [[1, 24], [2, 24], [4, 24]] and shallow["time_ids"] == [[1, 6], [2, 6], [4, 6]]
    assert "encoder_hidden_states" not in shallow and not manifest.model.cache_context
    assert manifest.model.step_cache and manifest.components["unet_shallow"].extra["weights"]
