"""What the shallow UNet of step caching adds to an artifact: its parameters, counted from the layers it runs.

    python -m sdtrt.benchmarks.step_cache_sizes --presets sd15-random,sdxl-random --branches 0,5

The UNet is built on PyTorch's meta device (no memory, no weights) and the shallow network runs once there with a
hook on every layer: the parameters of the layers that ran are the weights its ONNX file holds (shared weights
once), so the figure is what an export would add, without exporting. Bytes are 2 per parameter in fp16, 4 in fp32.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from sdtrt.runtime.errors import SdtrtError
from sdtrt.runtime.models.presets import preset_configs
from sdtrt.runtime.models.step_cache import ShallowUNet, cache_split, skip_count


def used_parameters(module: torch.nn.Module, run: Any) -> int:
    """How many parameters the layers of ``module`` that ``run()`` calls hold (each tensor counted once)."""
    seen: dict[int, int] = {}

    def record(layer: torch.nn.Module, _args: Any) -> None:
        for p in layer.parameters(recurse=False):
            seen[id(p)] = p.numel()

    hooks = [m.register_forward_pre_hook(record) for m in module.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(seen.values())


def shallow_size(unet_config: dict[str, Any], branch: int) -> dict[str, Any]:
    """Parameters of the UNet and of its shallow network at skip ``branch``, on the meta device."""
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_config)
    xl = unet.config.addition_embed_type == "text_time"
    split = cache_split(unet, branch)
    shallow = ShallowUNet(unet, split, xl, control=False)
    rows, side = 2, 64
    meta = torch.device("meta")
    sample = torch.zeros(rows, unet.config.in_channels, side, side, device=meta)
    inputs = [
        sample,
        torch.zeros(rows, device=meta),
        torch.zeros(rows, 77, unet.config.cross_attention_dim, device=meta),
    ]
    if xl:
        embeds = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs += [torch.zeros(rows, embeds, device=meta), torch.zeros(rows, 6, device=meta)]
    channels, factor = split.feature
    inputs.append(torch.zeros(rows, channels, side // factor, side // factor, device=meta))
    total = sum(p.numel() for p in unet.parameters())
    used = used_parameters(shallow, lambda: shallow(*inputs))
    return {"branch": branch, "skips": skip_count(unet), "unet_params": total, "shallow_params": used,
            "shallow_fraction": used / total, "fp16_mib": used / 2**19, "unet_fp16_mib": total / 2**19}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="sd15-random,sdxl-random")
    parser.add_argument("--branches", default="0,5", help="comma-separated skip branches")
    args = parser.parse_args(argv)
    print(f"{'preset':<12} {'branch':>6} {'shallow params':>15} {'of UNet':>8} {'fp16 adds':>10} {'UNet fp16':>10}")
    try:
        for preset in args.presets.split(","):
            for branch in (int(b) for b in args.branches.split(",")):
                s = shallow_size(preset_configs(preset)[1], branch)
                print(f"{preset:<12} {branch:>6} {s['shallow_params']:>15,} {100 * s['shallow_fraction']:>7.2f}% "
                      f"{s['fp16_mib']:>7.1f}MiB {s['unet_fp16_mib']:>7.0f}MiB")  # fmt: skip
    except SdtrtError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
