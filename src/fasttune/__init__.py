"""fasttune: fast, memory-lean, exact fine-tuning of open LLMs.

    model, tokenizer = fasttune.load(path, max_seq_length=4096, load_in_4bit=True)
    model = fasttune.add_lora(model, r=16, alpha=16)
    texts = fasttune.generate(model, tokenizer, ["Hello"], max_new_tokens=64, temperature=0.7)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .models import ArchSpec, CausalLM, load_model, load_tokenizer, save_model  # noqa: E402
from .generation import Generator, SamplingParams, generate  # noqa: E402


def auto_dtype(device) -> str:
    """The compute dtype when none is given (fasttune.load, the CLI, `model.dtype: auto`): bfloat16 on CUDA,
    float32 elsewhere (CPUs have no fast 16-bit matmuls, and float32 is exact)."""
    import torch

    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def load(path, max_seq_length: int = 4096, dtype=None, device=None, load_in_4bit: bool = False,
         allow_pickle: bool = False, keep_quantized: bool = False, revision: str | None = None):
    """Load a Hugging Face model folder (or a Hub repo id: from the HF cache, else downloaded unless HF_HUB_OFFLINE;
    `revision` a branch, tag or commit) and its tokenizer. `load_in_4bit` quantises every decoder linear to NF4
    as it is read (QLoRA base); `keep_quantized` (GGUF files) keeps the decoder linears as the file's quantised
    blocks, dequantised on the fly (LoRA over Q4_K / Q8_0 ... in about the file's memory); `device` defaults to
    CUDA when available; `dtype` (None or "auto") to `auto_dtype(device)`: bfloat16 on CUDA, float32 on CPU,
    whatever dtype the checkpoint is stored in."""
    import torch

    from .build import load_base
    from .models.checkpoint import resolve_pretrained

    path = resolve_pretrained(path, revision)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None or dtype == "auto":
        dtype = auto_dtype(device)
    model = load_base(path, max_seq_length=max_seq_length, dtype=dtype, device=device, load_in_4bit=load_in_4bit,
                      keep_quantized=keep_quantized, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(path)
    return model, tokenizer


def add_lora(model, r: int = 16, alpha: float = 16, **kwargs):
    """Attach LoRA adapters (default targets: q, k, v, o, gate, up, down); see `fasttune.adapters.add_lora`."""
    from .adapters import add_lora as _add_lora

    return _add_lora(model, r=r, alpha=alpha, **kwargs)


__all__ = ["ArchSpec", "CausalLM", "Generator", "SamplingParams", "add_lora", "generate", "load", "load_model",
           "load_tokenizer", "save_model"]
