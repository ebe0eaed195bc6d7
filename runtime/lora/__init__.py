"""LoRA: low-rank weight changes applied to an open pipeline's engines, on every backend, without re-export.

A LoRA ``.safetensors`` file, in the kohya / A1111 or the diffusers / PEFT spelling, is read into layers
(``files``), matched against the model's Linear/Conv2d modules and turned into fp32 weight deltas (``match``),
and given to each engine as one ``WeightUpdate`` (``apply``; ``Pipeline.set_loras`` calls it). ``write`` saves
layers in either spelling. LDM/SGM block names in kohya files resolve through ``sdtrt.runtime.ldm_names``.

Only ``match`` and ``apply`` need diffusers/transformers (for the model's structure, built on the ``meta`` device),
imported when called.
"""

from sdtrt.runtime.errors import LoraError
from sdtrt.runtime.lora.apply import ActiveLora, LoraSpec, LoraState, apply, parse_lora_option, read_loras
from sdtrt.runtime.lora.files import LORA_COMPONENTS, PEFT_METADATA_KEY, LoraFile, LoraFormat, LoraLayer, read_lora
from sdtrt.runtime.lora.match import lora_deltas, lora_family, model_family_of
from sdtrt.runtime.lora.write import save_lora

__all__ = [
    "ActiveLora",
    "LORA_COMPONENTS",
    "PEFT_METADATA_KEY",
    "LoraError",
    "LoraFile",
    "LoraFormat",
    "LoraLayer",
    "LoraSpec",
    "LoraState",
    "apply",
    "lora_deltas",
    "lora_family",
    "model_family_of",
    "parse_lora_option",
    "read_lora",
    "read_loras",
    "save_lora",
]
