"""ComfyUI's model nodes on a served checkpoint: loaders, LoRA, clip skip, text encoding, VAE decode/encode.

``CheckpointLoaderSimple`` lists the served models (``ckpt_name`` = a ``Checkpoints`` name) and gives handles
(``types``), not a loaded model; ``LoraLoader``/``LoraLoaderModelOnly`` add a LoRA of the server's LoRA folder
(``lora_name`` = its file name, as ComfyUI lists ``models/loras``) to the MODEL handle at ``strength_model`` and
to the CLIP handle at ``strength_clip``. sdtrt applies one set of LoRAs to a whole pipeline, so each node that
uses a handle first sets that handle's LoRAs (``serve.loras.use_loras``, a no-op when they are already set): text
encoding runs with the CLIP's set, sampling with the MODEL's, and the two strengths act separately as in ComfyUI.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..loras import use_loras
from .node import Node, NodeRun
from .types import ClipHandle, ModelHandle, VaeHandle

LORA_SUFFIX = ".safetensors"


def lora_names(library: Any) -> list[str]:
    """The LoRA folder's files as ComfyUI lists them (file names with their suffix)."""
    return [f"{name}{LORA_SUFFIX}" for name in library.loras.names]


def lora_file(library: Any, lora_name: str) -> str:
    """The absolute path of the LoRA ``lora_name`` (with or without its ``.safetensors`` suffix)."""
    stem = lora_name[: -len(LORA_SUFFIX)] if lora_name.endswith(LORA_SUFFIX) else lora_name
    return str(library.loras.path(stem, lora_name, "lora_name"))


def file_stamp(path: str | Path) -> Any:
    """What identifies a file's content cheaply: (path, size, modification time); None if it is gone."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns)


class CheckpointLoaderSimple(Node):
    NAME = "CheckpointLoaderSimple"
    DISPLAY_NAME = "Load Checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (
        "The model used for denoising latents.",
        "The CLIP model used for encoding text prompts.",
        "The VAE model used for encoding and decoding images to and from latent space.",
    )

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        names = [c.name for c in library.checkpoints.items]
        return {"required": {"ckpt_name": (names, {"tooltip": "The name of the checkpoint (model) to load."})}}

    @classmethod
    def changed(cls, library: Any, inputs: dict[str, Any]) -> Any:
        found = library.checkpoints.find(inputs.get("ckpt_name"))
        return None if found is None else (found.folder, found.sha256, file_stamp(Path(found.folder) / "manifest.json"))

    def run(self, run: NodeRun, ckpt_name: str) -> tuple:
        checkpoint = run.library.checkpoints.find(ckpt_name)
        if checkpoint is None:
            raise ValueError(f"ckpt_name {ckpt_name!r} is no longer a model of this server (refreshed?)")
        return ModelHandle(checkpoint), ClipHandle(checkpoint), VaeHandle(checkpoint)


class CLIPSetLastLayer(Node):
    NAME = "CLIPSetLastLayer"
    DISPLAY_NAME = "CLIP Set Last Layer"
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        layer = {"default": -1, "min": -24, "max": -1, "step": 1, "advanced": True}
        return {"required": {"clip": ("CLIP",), "stop_at_clip_layer": ("INT", layer)}}

    def run(self, run: NodeRun, clip: ClipHandle, stop_at_clip_layer: int) -> tuple:
        return (ClipHandle(clip.checkpoint, clip.loras, clip_skip=-stop_at_clip_layer),)


class CLIPTextEncode(Node):
    NAME = "CLIPTextEncode"
    DISPLAY_NAME = "CLIP Text Encode (Prompt)"
    CATEGORY = "conditioning"
    DESCRIPTION = (
        "Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion model "
        "towards generating specific images."
    )
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        text = {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}
        return {
            "required": {
                "text": ("STRING", text),
                "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
            }
        }

    def run(self, run: NodeRun, text: str, clip: ClipHandle) -> tuple:
        pipe = run.pipeline(clip.checkpoint)
        use_loras(pipe, clip.loras)
        return ([pipe.encode_conditioning(text, clip_skip=clip.clip_skip)],)


class LoraLoader(Node):
    NAME = "LoraLoader"
    DISPLAY_NAME = "Load LoRA (Model and CLIP)"
    CATEGORY = "loaders"
    DESCRIPTION = (
        "This LoRA loader is used to modify both diffusion and CLIP models, altering the way in which latents are "
        "denoised such as applying styles. Multiple LoRA nodes can be linked together."
    )
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
                "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
                "lora_name": (lora_names(library), {"tooltip": "The name of the LoRA."}),
                "strength_model": (
                    "FLOAT",
                    {**strength, "tooltip": "How strongly to modify the diffusion model. This value can be negative."},
                ),
                "strength_clip": (
                    "FLOAT",
                    {**strength, "tooltip": "How strongly to modify the CLIP model. This value can be negative."},
                ),
            }
        }

    @classmethod
    def changed(cls, library: Any, inputs: dict[str, Any]) -> Any:
        try:
            return file_stamp(lora_file(library, inputs.get("lora_name", "")))
        except Exception:  # an unknown name fails validation; nothing to stamp
            return None

    def run(
        self, run: NodeRun, model: ModelHandle, clip: ClipHandle, lora_name: str, strength_model: float,
        strength_clip: float,
    ) -> tuple:  # fmt: skip
        if strength_model == 0 and strength_clip == 0:
            return model, clip
        path = lora_file(run.library, lora_name)
        return (
            model.with_lora(path, strength_model) if strength_model != 0 else model,
            clip.with_lora(path, strength_clip) if strength_clip != 0 else clip,
        )


class LoraLoaderModelOnly(Node):
    NAME = "LoraLoaderModelOnly"
    DISPLAY_NAME = "Load LoRA"
    CATEGORY = "loaders"
    DESCRIPTION = (
        "This LoRAs loader is used to modify the diffusion model, altering the way in which latents are denoised "
        "such as applying styles. Multiple LoRA nodes can be linked together."
    )
    RETURN_TYPES = ("MODEL",)
    changed = LoraLoader.changed

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (lora_names(library),),
                "strength_model": ("FLOAT", strength),
            }
        }

    def run(self, run: NodeRun, model: ModelHandle, lora_name: str, strength_model: float) -> tuple:
        if strength_model == 0:
            return (model,)
        return (model.with_lora(lora_file(run.library, lora_name), strength_model),)


class VAEDecode(Node):
    NAME = "VAEDecode"
    DISPLAY_NAME = "VAE Decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
            }
        }

    def run(self, run: NodeRun, samples: dict, vae: VaeHandle) -> tuple:
        return (run.pipeline(vae.checkpoint).decode_images(samples["samples"]),)


class VAEEncode(Node):
    NAME = "VAEEncode"
    DISPLAY_NAME = "VAE Encode"
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def run(self, run: NodeRun, pixels: torch.Tensor, vae: VaeHandle) -> tuple:
        return ({"samples": run.pipeline(vae.checkpoint).encode_images(pixels)},)


def inpaint_pixels(pixels: torch.Tensor, mask: torch.Tensor, grow_mask_by: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's VAEEncodeForInpaint before encoding: the pixels cropped to multiples of 8 around the center with
    the masked ones set to 0.5 (gray), and the noise mask grown by ``grow_mask_by`` pixels (a box filter)."""
    height, width = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
    flat = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float()
    mask = torch.nn.functional.interpolate(flat, size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = pixels.clone()
    if pixels.shape[1] != height or pixels.shape[2] != width:
        top, left = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, top : height + top, left : width + left, :]
        mask = mask[:, :, top : height + top, left : width + left]
    if grow_mask_by == 0:
        grown = mask
    else:
        kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
        padding = math.ceil((grow_mask_by - 1) / 2)
        grown = torch.clamp(torch.nn.functional.conv2d(mask.round(), kernel, padding=padding), 0, 1)
    keep = (1.0 - mask.round()).squeeze(1)
    for channel in range(3):
        pixels[:, :, :, channel] = (pixels[:, :, :, channel] - 0.5) * keep + 0.5
    return pixels, grown[:, :, :height, :width].round()


class VAEEncodeForInpaint(Node):
    NAME = "VAEEncodeForInpaint"
    DISPLAY_NAME = "VAE Encode (for Inpainting)"
    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        grow = {"default": 6, "min": 0, "max": 64, "step": 1}
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",), "grow_mask_by": ("INT", grow)}}

    def run(
        self, run: NodeRun, pixels: torch.Tensor, vae: VaeHandle, mask: torch.Tensor, grow_mask_by: int = 6
    ) -> tuple:
        gray, noise_mask = inpaint_pixels(pixels[..., :3].float(), mask, grow_mask_by)
        return ({"samples": run.pipeline(vae.checkpoint).encode_images(gray), "noise_mask": noise_mask},)


MODEL_NODES = (
    CheckpointLoaderSimple,
    CLIPTextEncode,
    CLIPSetLastLayer,
    LoraLoader,
    LoraLoaderModelOnly,
    VAEDecode,
    VAEEncode,
    VAEEncodeForInpaint,
)
