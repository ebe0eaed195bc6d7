"""diffusers' own pipeline over a bundle's modules: the reference every sdtrt path is compared with.

Used by the benchmarks (the PyTorch baseline), by the shapes quality figures and by the fidelity tests.
"""

from __future__ import annotations

from typing import Any

from sdtrt.runtime.deps import require

# sdtrt sampler name -> (diffusers scheduler class, options on top of the model's scheduler config)
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": ("LCMScheduler", {}),
}


def diffusers_pipeline(bundle: Any, scheduler: str) -> Any:
    """diffusers' StableDiffusionPipeline over the bundle's modules, with the same sampler and CLIP tokenizer."""
    diffusers = require("diffusers", "the diffusers reference pipeline", "export")
    transformers = require("transformers", "the diffusers reference pipeline", "export")
    from .tokenizer import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    tokenizer = transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    cls_name, kwargs = DIFFUSERS_SCHEDULERS[scheduler]
    pipe = diffusers.StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=tokenizer,
        unet=bundle.unet,
        scheduler=getattr(diffusers, cls_name).from_config(bundle.scheduler_config, **kwargs),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
