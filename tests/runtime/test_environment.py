"""The environment report shared by `sdtrt doctor` and the benchmark rows."""

from __future__ import annotations

import sys

import torch

from sdtrt.runtime.environment import LibraryInfo, gather_environment, library_info


def test_gather_environment_names_torch_and_the_libraries():
    env = gather_environment(("numpy", "sdtrt_no_such_module"))
    assert env.torch == torch.__version__ and env.torch_cuda == torch.version.cuda
    assert env.python.count(".") == 2 and env.cpu and env.platform
    assert list(env.libraries) == ["numpy", "sdtrt_no_such_module"]
    assert env.version("numpy") and env.version("sdtrt_no_such_module") is None
    assert env.version("not-asked-for") is None
    assert env.libraries["sdtrt_no_such_module"].describe() == "not installed"
    assert len(env.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_a_library_that_fails_to_import_says_why(monkeypatch):
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "sdtrt_broken_module":
                raise ImportError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    info = library_info("sdtrt_broken_module")
    assert not info.installed
    assert info.describe() == "fails to import (libcudart.so.12: cannot open shared object file)"


def test_onnxruntime_lists_its_providers():
    info = LibraryInfo("onnxruntime", "1.20.1", providers=("CPUExecutionProvider",))
    assert info.describe() == "1.20.1 (CPUExecutionProvider)"
    assert LibraryInfo("onnx", "1.17.0").describe() == "1.17.0"
