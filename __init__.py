"""sdtrt: Stable Diffusion exported to ONNX and TensorRT, run by a lean runtime.

Subpackages, from the bottom up (each imports only those above it in this list, never one below):
    sdtrt.runtime    read artifact folders and run the pipeline (needs torch, numpy, tokenizers + one backend);
                     ``runtime/models/`` loads PyTorch sources (diffusers/transformers, extra ``sdtrt[export]``)
    sdtrt.export     turn PyTorch models into ONNX artifact folders and TensorRT engines, and check them
    sdtrt.calibrate  quantize exported UNets (int8 / fp8) and measure the result
    sdtrt.shapes     the built-in trained ``shapes`` model: data, trainer, scorer, and its config for the above
    sdtrt.benchmarks measure backends side by side (public APIs only)
    sdtrt.serve      the HTTP server (AUTOMATIC1111's API) and the Ray Serve deployment; a client of the runtime only
    sdtrt.cli        the ``sdtrt`` command: one module per command, each a thin call into the packages above
"""

__version__ = "0.1.0"
