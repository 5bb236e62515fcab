"""The native model core: one decoder configured per family, Hugging Face checkpoints in and out."""
from .checkpoint import CheckpointError, load_model, load_tokenizer, save_model
from .compare import LayerError, capture_hidden_states, compare_models, compare_states
from .decoder import CausalLM, CausalLMOutput, KVCache
from .generate import generate
from .spec import SUPPORTED_MODEL_TYPES, ArchSpec, UnsupportedModelError

__all__ = ["ArchSpec", "CausalLM", "CausalLMOutput", "CheckpointError", "KVCache", "LayerError",
           "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "capture_hidden_states", "compare_models",
           "compare_states", "generate", "load_model", "load_tokenizer", "save_model"]
