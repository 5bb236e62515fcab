"""Export a fine-tuned model: PEFT adapters, merged 16-bit checkpoints, GGUF files and Ollama Modelfiles."""
from .adapter import AdapterError, adapter_state_dict, load_adapter, save_adapter
from .gguf_writer import GGUFExportError, QUANT_TYPES, export_gguf
from .merged import ExportResult, export_merged, iter_merged_tensors, merged_state_dict
from .modelfile import ModelfileError, make_modelfile

__all__ = ["AdapterError", "ExportResult", "GGUFExportError", "ModelfileError", "QUANT_TYPES", "adapter_state_dict",
           "export_gguf", "export_merged", "iter_merged_tensors", "load_adapter", "make_modelfile",
           "merged_state_dict", "save_adapter"]
