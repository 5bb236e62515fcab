"""Export a fine-tuned model: PEFT adapters, merged 16-bit checkpoints, GGUF files and Ollama Modelfiles."""
from ..adapters.peft import AdapterError, adapter_state_dict, load_adapter, save_adapter
from .merged import ExportResult, export_merged, iter_merged_tensors, merged_state_dict
from .modelfile import ModelfileError, make_modelfile

__all__ = ["AdapterError", "ExportResult", "GGUFExportError", "ModelfileError", "QUANT_TYPES", "adapter_state_dict",
           "export_gguf", "export_merged", "iter_merged_tensors", "load_adapter", "make_modelfile",
           "merged_state_dict", "save_adapter"]

_GGUF_NAMES = ("GGUFExportError", "QUANT_TYPES", "export_gguf")


def __getattr__(name: str):
    # the `gguf` package is an optional dependency (fasttune[export]): import it only when GGUF is asked for, so that
    # saving adapters or merged checkpoints never needs it
    if name in _GGUF_NAMES:
        from . import gguf_writer

        return getattr(gguf_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
