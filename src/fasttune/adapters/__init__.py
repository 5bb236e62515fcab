"""LoRA and QLoRA: low-rank adapters on the decoder's projections (and, when named, the LM head), over
bf16/fp16 or NF4 base weights.

    model = fasttune.add_lora(model, r=16, alpha=16)           # all seven projections
    model = fasttune.add_lora(model, target_modules=["all-linear", "lm_head"])   # ... and the output layer
    optimizer = torch.optim.AdamW(param_groups(model, lr=2e-4))
"""
from .config import ALL_TARGETS, LM_HEAD, TARGETS, LoraConfig, normalize_targets
from .attach import add_lora, disable_adapters, lora_layers, lora_parameters, param_groups
from .layer import LoraLinear, LoraLMHead

__all__ = ["ALL_TARGETS", "LM_HEAD", "TARGETS", "LoraConfig", "LoraLinear", "LoraLMHead", "add_lora",
           "disable_adapters", "lora_layers", "lora_parameters", "normalize_targets", "param_groups"]
