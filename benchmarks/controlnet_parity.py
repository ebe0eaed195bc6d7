import sys, tempfile, pathlib
sys.path.insert(0, "/work/main")
import numpy as np, torch
from PIL import Image
from tests.conftest import make_tiny_controlnet, CONTROL_FIXTURES
import tests.runtime.control.test_control_pipeline as T
from sdtrt.runtime.models.presets import load_preset
from sdtrt.export.controlnet import ControlNetArg, load_controlnets
from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.runtime.profile import ShapeProfile
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.compare import psnr
b = load_preset("tiny"); d = pathlib.Path(tempfile.mkdtemp()); cns = {}
for n, seed in CONTROL_FIXTURES.items():
    m = make_tiny_controlnet(b.unet, seed); m.save_pretrained(d / n); cns[n] = (d / n, m)
export_artifacts(b, d / "A", ExportOptions(profile=ShapeProfile.square(64, 128, 256, max_batch=4)),
                 controlnets=load_controlnets([ControlNetArg(str(p), n) for n, (p, _) in cns.items()], b.model))
init = Image.fromarray((np.random.default_rng(5).random((64, 64, 3)) * 255).astype(np.uint8))
cases = {
 "one ControlNet": (lambda: [T.control("edges")], {}, dict(names=["edges"])),
 "two (MultiControlNetModel, scales 0.6 / 1.3)": (lambda: [T.control("edges", scale=0.6), T.control("depth", scale=1.3)], {}, dict(names=["edges", "depth"], controlnet_conditioning_scale=[0.6, 1.3])),
 "start/end 0.2/0.8 (10 steps)": (lambda: [T.control("edges", start=0.2, end=0.8)], {"steps": 10}, dict(names=["edges"], control_guidance_start=0.2, control_guidance_end=0.8, num_inference_steps=10)),
 "guess mode": (lambda: [T.control("edges", guess_mode=True)], {}, dict(names=["edges"], guess_mode=True)),
 "CFG off, 2 images": (lambda: [T.control("depth")], {"guidance_scale": 1.0, "num_images": 2}, dict(names=["depth"], guidance_scale=1.0, images=2)),
 "img2img, strength 0.75 (8 steps)": (lambda: [T.control("edges")], {"image": init, "strength": 0.75, "steps": 8}, dict(names=["edges"], img2img=init, strength=0.75, num_inference_steps=8, controlnet_conditioning_scale=1.0)),
}
print("| case | ONNX Runtime | torch | vs no control |")
print("|---|---|---|---|")
pipes = {k: Pipeline.from_artifacts(d / "A", backend=k) for k in ("onnxruntime", "torch")}
for name, (ctrl, kw, ref) in cases.items():
    ref = dict(ref); names = ref.pop("names")
    want = T.reference(cns, names, **ref)
    got = {k: T.run(p, ctrl(), **kw) for k, p in pipes.items()}
    plain = T.run(pipes["onnxruntime"], [], **kw)
    print(f"| {name} | {psnr(got['onnxruntime'], want):.1f} dB | {psnr(got['torch'], want):.1f} dB | {psnr(got['onnxruntime'], plain):.1f} dB |")
