"""LoRA and QLoRA: low-rank adapters on the decoder's projections (and, when named, the LM head), over dense or
quantised (NF4, GGUF blocks) base weights; per-expert adapters on MoE expert stacks (experts.py). One home for the
concept: the layer (layer.py), its settings and scaling (config.py), attaching and switching off (attach.py),
which parameters train and their optimizer groups (params.py), the saved files (files.py) and PEFT's format both
ways (peft.py). Merging is `LoraLinear.merged_weight` (`LoraExperts.merged_weight` for expert stacks).

    model = fasttune.add_lora(model, r=16, alpha=16)           # all seven projections
    model = fasttune.add_lora(model, target_modules=["all-linear", "lm_head"])   # ... and the output layer
    optimizer = torch.optim.AdamW(param_groups(model, lr=2e-4))
"""
from .attach import add_lora, attach_lora, disable_adapters, lora_expert_layers, lora_layers
from .config import ALL_TARGETS, LM_HEAD, ROUTER, TARGETS, LoraConfig, lora_scaling, normalize_targets
from .experts import ExpertAdapter, LoraExperts
from .layer import LoraLinear, LoraLMHead
from .params import EMBEDDING_LR_RATIO, lora_parameters, param_groups

__all__ = ["ALL_TARGETS", "EMBEDDING_LR_RATIO", "LM_HEAD", "ROUTER", "TARGETS", "ExpertAdapter", "LoraConfig",
           "LoraExperts", "LoraLinear", "LoraLMHead", "add_lora", "attach_lora", "disable_adapters",
           "lora_expert_layers", "lora_layers", "lora_parameters", "lora_scaling", "normalize_targets",
           "param_groups"]
