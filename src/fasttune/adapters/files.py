"""The file names of saved adapters: one place for the code that writes them and the code that reads them.

A training run's adapter/ folder holds both layouts: fasttune's own (every trained tensor, and the run's record)
and PEFT's (what `fasttune export`, PEFT, Unsloth and other tools read). A checkpoint (checkpoints/step-N) holds
TRAINED_WEIGHTS beside its trainer state.
"""
RUN_RECORD = "fasttune_adapter.json"  # base model, lora section, objective, chat template, step of a run's adapter
TRAINED_WEIGHTS = "trainable.safetensors"  # every trained tensor (adapters, embeddings, reward head), keyed by module
PEFT_CONFIG = "adapter_config.json"  # PEFT's adapter config
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's tensors (base_model.model.<path>.lora_A.weight, ...)
