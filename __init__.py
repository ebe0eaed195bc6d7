"""sdtrt: Stable Diffusion exported to ONNX and TensorRT, run by a lean runtime.

Subpackages:
    sdtrt.runtime    read artifact folders and run the pipeline (needs torch, numpy, tokenizers + one backend)
    sdtrt.export     turn PyTorch models into ONNX artifact folders (extra: ``sdtrt[export]``)
    sdtrt.calibrate  quantize exported UNets
    sdtrt.benchmarks measure backends side by side
"""

__version__ = "0.1.0"
