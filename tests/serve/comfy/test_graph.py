"""The ComfyUI graph interpreter: validation with ComfyUI's error bodies (every error type, the node named), the
dependency order, the signature cache between prompts (a repeated prompt runs nothing, a new seed re-runs only the
sampler and what follows), independent branches, a failing node and an interrupted one. The nodes are the real
ones, on the tiny model exported for real and run on ONNX Runtime (CPU)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt.serve.comfy.folders import ComfyFolders
from sdtrt.serve.comfy.graph import (
    ExecutionContext,
    ExecutionInterrupted,
    GraphExecutor,
    NodeFailed,
    PromptError,
    validate_prompt,
)
from sdtrt.serve.comfy.nodes import NodeLibrary
from sdtrt.serve.loras import LoraLibrary
from sdtrt.serve.models import Checkpoints, PipelinePool

ERROR_KEYS = {"type", "message", "details", "extra_info"}


class Recorder:
    """ExecutionEvents that keeps every call in order; ``on_progress`` may act on a progress event."""

    def __init__(self, on_progress=None) -> None:
        self.events: list[tuple] = []
        self.on_progress = on_progress

    def execution_cached(self, nodes):
        self.events.append(("execution_cached", list(nodes)))

    def executing(self, node):
        self.events.append(("executing", node))

    def progress(self, node, value, maximum, preview):
        self.events.append(("progress", node, value, maximum, preview))
        if self.on_progress is not None:
            self.on_progress(node, value)

    def executed(self, node, output):
        self.events.append(("executed", node, output))

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]

    def ran(self) -> list[str]:
        return [e[1] for e in self.of("executing")]


@pytest.fixture(scope="module")
def graph_folders(tmp_path_factory) -> ComfyFolders:
    return ComfyFolders(tmp_path_factory.mktemp("comfy")).create()


@pytest.fixture(scope="module")
def graph_library(tiny_fp32, graph_folders) -> NodeLibrary:
    return NodeLibrary(Checkpoints(tiny_fp32), LoraLibrary(None), graph_folders)


@pytest.fixture(scope="module")
def graph_pool():
    from sdtrt.runtime.pipeline import Pipeline

    pool = PipelinePool(lambda checkpoint: Pipeline.from_artifacts(checkpoint.folder, device="cpu"))
    yield pool
    pool.close_all()


def graph_context(pool: PipelinePool, **kwargs) -> ExecutionContext:
    return ExecutionContext(pool.get, threading.Event(), **kwargs)


def default_graph(ckpt_name: str, seed: int = 5, steps: int = 3, size: int = 64) -> dict:
    """ComfyUI's default workflow in API format (its node ids), at the tiny model's size."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 8,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "beautiful scenery nature glass bottle landscape", "clip": ["4", 1]},
            "_meta": {"title": "CLIP Text Encode (Prompt)"},
        },
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


@pytest.fixture
def graph(graph_library) -> dict:
    return default_graph(graph_library.checkpoints.items[0].name)


def refused(prompt, library, **kwargs) -> dict:
    with pytest.raises(PromptError) as info:
        validate_prompt(prompt, library, **kwargs)
    body = info.value.body()
    assert set(body) == {"error", "node_errors"}
    assert set(body["error"]) == ERROR_KEYS
    for node_id, entry in body["node_errors"].items():
        assert set(entry) == {"errors", "dependent_outputs", "class_type"}
        assert entry["class_type"] == prompt[node_id]["class_type"]
        for e in entry["errors"]:
            assert set(e) == ERROR_KEYS and isinstance(e["extra_info"], dict)
    return body


def node_error(body: dict, node_id: str, kind: str) -> dict:
    """The one error of ``node_id`` in a prompt_outputs_failed_validation body, of type ``kind``."""
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["message"] == "Prompt outputs failed validation"
    assert list(body["node_errors"]) == [node_id], body["node_errors"]
    errors = body["node_errors"][node_id]["errors"]
    assert [e["type"] for e in errors] == [kind], errors
    return errors[0]


# -- validation --------------------------------------------------------------------------------------------------
def test_the_default_workflow_validates_to_its_output(graph, graph_library):
    assert validate_prompt(graph, graph_library) == ["9"]


@pytest.mark.parametrize("prompt", [[], "x", None])
def test_a_prompt_that_is_not_an_object_is_invalid_prompt(prompt, graph_library):
    body = refused(prompt, graph_library)
    assert body["error"]["type"] == "invalid_prompt" and body["node_errors"] == {}


def test_unknown_and_missing_class_types_are_missing_node_type(graph, graph_library):
    graph["5"]["class_type"] = "EmptySD3LatentImage"
    body = refused(graph, graph_library)
    assert body["error"]["type"] == "missing_node_type"
    assert body["error"]["details"] == "Node ID '#5'"
    assert body["error"]["extra_info"]["class_type"] == "EmptySD3LatentImage"
    assert "KSampler" in body["error"]["message"]  # says what runs
    del graph["5"]["class_type"]
    assert refused(graph, graph_library)["error"]["extra_info"] == {
        "node_id": "5",
        "class_type": None,
        "node_title": None,
    }


def test_no_output_node_is_prompt_no_outputs(graph, graph_library):
    del graph["9"]
    assert refused(graph, graph_library)["error"]["type"] == "prompt_no_outputs"


def test_a_graph_larger_than_max_nodes_is_refused(graph, graph_library):
    body = refused(graph, graph_library, max_nodes=6)
    assert body["error"]["type"] == "invalid_prompt" and "at most 6" in body["error"]["message"]


def test_unknown_node_fields_are_refused(graph, graph_library):
    graph["5"]["is_changed"] = True
    assert refused(graph, graph_library)["error"]["type"] == "invalid_prompt"


def test_required_input_missing(graph, graph_library):
    del graph["3"]["inputs"]["seed"]
    error = node_error(refused(graph, graph_library), "3", "required_input_missing")
    assert error["details"] == "seed" and error["extra_info"] == {"input_name": "seed"}


@pytest.mark.parametrize(
    ("node", "name", "value"),
    [("3", "sampler_name", "dpmpp_sde"), ("3", "scheduler", "beta_x"), ("4", "ckpt_name", "v1-5-pruned.safetensors")],
)
def test_values_not_in_the_lists_are_refused_naming_node_and_value(graph, graph_library, node, name, value):
    graph[node]["inputs"][name] = value
    error = node_error(refused(graph, graph_library), node, "value_not_in_list")
    assert error["details"].startswith(f"{name}: '{value}' not in")
    assert error["extra_info"]["received_value"] == value and error["extra_info"]["input_name"] == name


def test_a_link_of_the_wrong_type_is_return_type_mismatch(graph, graph_library):
    graph["8"]["inputs"]["vae"] = ["4", 1]
    error = node_error(refused(graph, graph_library), "8", "return_type_mismatch")
    assert error["details"] == "vae, received_type(CLIP) mismatch input_type(VAE)"
    assert error["extra_info"]["linked_node"] == ["4", 1]


@pytest.mark.parametrize(
    ("node", "name", "value"),
    [("3", "steps", "20"), ("3", "steps", 2.5), ("3", "cfg", "high"), ("6", "text", 5), ("3", "seed", True),
     ("3", "cfg", float("nan")), ("4", "ckpt_name", 3)],
)  # fmt: skip
def test_literals_of_the_wrong_type_are_invalid_input_type(graph, graph_library, node, name, value):
    graph[node]["inputs"][name] = value
    error = node_error(refused(graph, graph_library), node, "invalid_input_type")
    assert error["details"].startswith(f"{name}, ")
    assert error["extra_info"]["input_name"] == name


def test_a_literal_for_a_linked_type_is_invalid_input_type(graph, graph_library):
    graph["3"]["inputs"]["model"] = "sd15"
    assert "take a link" in node_error(refused(graph, graph_library), "3", "invalid_input_type")["details"]


@pytest.mark.parametrize(
    ("name", "value", "kind"),
    [("steps", 0, "value_smaller_than_min"), ("cfg", 100.5, "value_bigger_than_max"),
     ("denoise", 1.5, "value_bigger_than_max"), ("seed", 2**64, "value_bigger_than_max")],
)  # fmt: skip
def test_out_of_range_values(graph, graph_library, name, value, kind):
    graph["3"]["inputs"][name] = value
    error = node_error(refused(graph, graph_library), "3", kind)
    assert error["details"] == name and error["extra_info"]["received_value"] == value


def test_integral_floats_are_ints_as_json_numbers_allow(graph, graph_library):
    graph["3"]["inputs"]["steps"] = 3.0
    assert validate_prompt(graph, graph_library) == ["9"]


@pytest.mark.parametrize("link", [["99", 0], ["4", 3], ["4"], [4, 0], ["4", -1]])
def test_bad_links_are_bad_linked_input(graph, graph_library, link):
    graph["8"]["inputs"]["vae"] = link
    error = node_error(refused(graph, graph_library), "8", "bad_linked_input")
    assert error["details"].startswith("vae: ") and error["extra_info"]["received_value"] == link


def test_a_dependency_cycle_is_refused_naming_its_nodes(graph, graph_library):
    graph["10"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["11", 0], "upscale_method": "area", "scale_by": 1},
    }
    graph["11"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["10", 0], "upscale_method": "area", "scale_by": 1},
    }
    graph["3"]["inputs"]["latent_image"] = ["11", 0]
    body = refused(graph, graph_library)
    assert sorted(body["node_errors"]) == ["10", "11"]
    for node_id in ("10", "11"):
        (error,) = body["node_errors"][node_id]["errors"]
        assert error["type"] == "dependency_cycle" and error["extra_info"]["nodes"] == ["10", "11"]
        assert body["node_errors"][node_id]["dependent_outputs"] == ["9"]


def test_an_input_the_node_does_not_declare_is_refused(graph, graph_library):
    graph["5"]["inputs"]["depth"] = 3
    error = node_error(refused(graph, graph_library), "5", "undeclared_input")
    assert error["extra_info"] == {"input_name": "depth"} and "width, height, batch_size" in error["details"]


def test_custom_validation_of_files(graph, graph_library, graph_folders):
    graph["9"]["inputs"]["filename_prefix"] = "../outside"
    error = node_error(refused(graph, graph_library), "9", "custom_validation_failed")
    assert error["details"].startswith("filename_prefix - ")
    graph["9"]["inputs"]["filename_prefix"] = "/etc/x"
    node_error(refused(graph, graph_library), "9", "custom_validation_failed")
    image = {"class_type": "LoadImage", "inputs": {"image": "missing.png", "upload": "image"}}
    prompt = {"1": image, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    assert (
        "Invalid image file: missing.png"
        in node_error(refused(prompt, graph_library), "1", "custom_validation_failed")["details"]
    )
    image["inputs"]["image"] = "../secret.png"
    node_error(refused(prompt, graph_library), "1", "custom_validation_failed")
    Image.new("RGB", (8, 8)).save(graph_folders.input / "ok.png")
    image["inputs"]["image"] = "ok.png"
    assert validate_prompt(prompt, graph_library) == ["2"]
    image["inputs"]["upload"] = "video"  # the frontend's upload widget says "image" and nothing else
    node_error(refused(prompt, graph_library), "1", "undeclared_input")


def test_only_the_bad_node_is_named_and_every_output_depending_on_it(graph, graph_library):
    graph["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    graph["5"]["inputs"]["width"] = 8
    body = refused(graph, graph_library)
    assert list(body["node_errors"]) == ["5"]
    assert body["node_errors"]["5"]["dependent_outputs"] == ["9", "10"]
    assert "EmptyLatentImage 5: Value 8 smaller than min of 16: width" in body["error"]["details"]


def test_validation_does_not_change_the_prompt(graph, graph_library):
    before = copy.deepcopy(graph)
    graph["3"]["inputs"]["steps"] = 3.0
    before["3"]["inputs"]["steps"] = 3.0
    validate_prompt(graph, graph_library)
    assert graph == before


# -- execution: order, cache, failures ---------------------------------------------------------------------------
def assert_dependency_order(prompt: dict, ran: list[str]) -> None:
    for node_id in ran:
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list) and value[0] in ran:
                assert ran.index(value[0]) < ran.index(node_id), (value[0], node_id, ran)


def test_a_graph_runs_in_dependency_order_then_runs_nothing_the_second_time(graph, graph_library, graph_pool):
    executor = GraphExecutor(graph_library)
    first = Recorder()
    ui = executor.execute(graph, ["9"], graph_context(graph_pool), first)
    assert first.events[0] == ("execution_cached", [])
    assert sorted(first.ran()) == sorted(graph) and len(first.ran()) == len(graph)
    assert_dependency_order(graph, first.ran())
    assert [(e[1], e[2], e[3]) for e in first.of("progress")] == [("3", 1, 3), ("3", 2, 3), ("3", 3, 3)]
    assert all(e[4] is None for e in first.of("progress"))  # no previews asked
    (image,) = ui["9"]["images"]
    assert first.events[-1] == ("executed", "9", ui["9"])
    saved = sorted(graph_library.folders.output.iterdir())

    second = Recorder()
    assert executor.execute(copy.deepcopy(graph), ["9"], graph_context(graph_pool), second) == ui
    assert second.events == [("execution_cached", list(graph)), ("executed", "9", ui["9"])]
    assert sorted(graph_library.folders.output.iterdir()) == saved  # nothing written again, as ComfyUI


def test_a_new_seed_reruns_only_the_sampler_and_its_dependants(graph, graph_library, graph_pool):
    executor = GraphExecutor(graph_library)
    executor.execute(graph, ["9"], graph_context(graph_pool), Recorder())
    graph["3"]["inputs"]["seed"] = 6
    events = Recorder()
    executor.execute(graph, ["9"], graph_context(graph_pool), events)
    assert events.events[0] == ("execution_cached", ["4", "5", "6", "7"])
    assert events.ran() == ["3", "8", "9"]
    graph["7"]["inputs"]["text"] = "blurry"  # the negative prompt: its encoder, the sampler and what follows
    events = Recorder()
    executor.execute(graph, ["9"], graph_context(graph_pool), events)
    assert events.ran() == ["7", "3", "8", "9"]


def test_the_cache_keeps_only_the_last_prompt(graph, graph_library, graph_pool):
    executor = GraphExecutor(graph_library)
    executor.execute(graph, ["9"], graph_context(graph_pool), Recorder())
    other = default_graph(graph_library.checkpoints.items[0].name, seed=9)
    other["6"]["inputs"]["text"] = "a red square"
    executor.execute(other, ["9"], graph_context(graph_pool), Recorder())
    assert len(executor.cache) == len(other)  # seven signatures: the first prompt's sampler and prompt are gone
    events = Recorder()
    executor.execute(graph, ["9"], graph_context(graph_pool), events)
    assert events.ran() == ["6", "3", "8", "9"]


def test_independent_branches_run_once_each_with_shared_nodes_once(graph, graph_library, graph_pool):
    graph["13"] = copy.deepcopy(graph["3"])
    graph["13"]["inputs"]["seed"] = 11
    graph["18"] = {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 2]}}
    graph["19"] = {"class_type": "PreviewImage", "inputs": {"images": ["18", 0]}}
    outputs = validate_prompt(graph, graph_library)
    assert outputs == ["9", "19"]
    events = Recorder()
    ui = GraphExecutor(graph_library).execute(graph, outputs, graph_context(graph_pool), events)
    assert sorted(events.ran()) == sorted(graph)  # every node once
    assert_dependency_order(graph, events.ran())
    assert ui["19"]["images"][0]["type"] == "temp" and ui["9"]["images"][0]["type"] == "output"
    a = np.array(Image.open(graph_library.folders.output / ui["9"]["images"][0]["filename"]))
    b = np.array(Image.open(graph_library.folders.temp / ui["19"]["images"][0]["filename"]))
    assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)  # two seeds, two images


def test_a_failing_node_is_named_and_not_cached(graph, graph_library, graph_pool):
    graph["3"]["inputs"]["denoise"] = 0.0001  # valid values; the schedule would need 30000 steps
    executor = GraphExecutor(graph_library)
    with pytest.raises(NodeFailed) as info:
        executor.execute(graph, ["9"], graph_context(graph_pool), Recorder())
    failed = info.value
    assert (failed.node_id, failed.node_type) == ("3", "KSampler")
    assert failed.exception_type == "sdtrt.runtime.errors.ConfigError" and "30000" in failed.exception_message
    assert sorted(failed.executed) == ["4", "5", "6", "7"] and failed.traceback
    data = failed.message_data()
    assert set(data) == {"node_id", "node_type", "executed", "exception_message", "exception_type", "traceback",
                         "current_inputs", "current_outputs"}  # fmt: skip
    assert data["current_inputs"]["seed"] == [5] and data["current_outputs"] == ["4", "5", "6", "7"]
    graph["3"]["inputs"]["denoise"] = 1.0
    events = Recorder()
    executor.execute(graph, ["9"], graph_context(graph_pool), events)
    assert events.events[0] == ("execution_cached", ["4", "5", "6", "7"])  # what ran before the failure is cached
    assert events.ran() == ["3", "8", "9"]


def test_a_file_that_is_not_an_image_fails_in_load_image(graph_library, graph_pool):
    (graph_library.folders.input / "broken.png").write_bytes(b"not a png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    with pytest.raises(NodeFailed) as info:
        GraphExecutor(graph_library).execute(
            prompt, validate_prompt(prompt, graph_library), graph_context(graph_pool), Recorder()
        )
    assert info.value.node_id == "1" and info.value.exception_type == "PIL.UnidentifiedImageError"


def test_interrupt_stops_between_steps_and_the_sampler_runs_again_next_time(graph, graph_library, graph_pool):
    graph["3"]["inputs"]["steps"] = 4
    context = graph_context(graph_pool)
    events = Recorder(on_progress=lambda node, value: context.cancel.set() if value == 2 else None)
    executor = GraphExecutor(graph_library)
    with pytest.raises(ExecutionInterrupted) as info:
        executor.execute(graph, ["9"], context, events)
    assert (info.value.node_id, info.value.node_type) == ("3", "KSampler")
    assert sorted(info.value.executed) == ["4", "5", "6", "7"]
    assert [e[2] for e in events.of("progress")] == [1, 2]  # stopped after the step that set it
    events = Recorder()
    executor.execute(graph, ["9"], graph_context(graph_pool), events)
    assert events.ran() == ["3", "8", "9"]


def test_a_set_cancel_event_stops_before_the_first_node(graph, graph_library, graph_pool):
    context = graph_context(graph_pool)
    context.cancel.set()
    with pytest.raises(ExecutionInterrupted) as info:
        GraphExecutor(graph_library).execute(graph, ["9"], context, Recorder())
    assert info.value.executed == []


def test_previews_come_with_progress_when_asked(graph, graph_library, graph_pool):
    events = Recorder()
    GraphExecutor(graph_library).execute(graph, ["9"], graph_context(graph_pool, previews=True), events)
    previews = [e[4] for e in events.of("progress")]
    assert len(previews) == 3 and all(isinstance(p, Image.Image) and p.size == (8, 8) for p in previews)


def test_folder_fixture_is_the_library_folder(graph_library, graph_folders):
    assert graph_library.folders is graph_folders and Path(graph_folders.output).is_dir()


def test_a_node_whose_check_raises_is_exception_during_validation_not_a_crash(graph, tiny_fp32, graph_folders):
    from sdtrt.serve.comfy.nodes_latent import EmptyLatentImage

    class Fragile(EmptyLatentImage):  # a node whose own check has a bug
        NAME = "Fragile"

        @classmethod
        def check(cls, library, inputs):
            raise KeyError("width_px")

    library = NodeLibrary(Checkpoints(tiny_fp32), LoraLibrary(None), graph_folders)
    library.nodes["Fragile"] = Fragile
    graph["5"]["class_type"] = "Fragile"
    error = node_error(refused(graph, library), "5", "exception_during_validation")
    assert error["details"] == "'width_px'" and error["extra_info"]["exception_type"] == "KeyError"
    assert error["extra_info"]["traceback"]
