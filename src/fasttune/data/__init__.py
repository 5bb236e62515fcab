"""fasttune data pipeline: any table, chat log or text corpus -> tokenised, masked, packed batches.

Trainer-facing API:
    build_dataset(source, tokenizer, **options) -> DataSplits(train, eval, stats, kind, chat_template)
    iter_batches(examples, batch_size=..., packing=..., max_seq_length=..., pad_token_id=..., seed=...) -> batches
    DataCollator(pad_token_id, packing=False)          # collate_fn for torch DataLoader
    num_target_tokens(batch) -> int                    # labels[:, 1:] != -100, for exact gradient accumulation
"""
from importlib.resources import files

from ..labels import IGNORE_INDEX
from .chat_templates import REGISTERED as CHAT_TEMPLATES
from .chat_templates import ChatTemplate, get_chat_template, register_chat_template
from .conversations import standardize_conversation
from .dataset import DataSplits, DataStats, StreamingExamples, build_dataset
from .errors import DataError, Location, TemplateError
from .packing import (DataCollator, bucket_length, collate_packed, collate_packed_rows, collate_padded, iter_batches,
                      length_buckets, length_grouped_batches, num_target_tokens, pack_examples, pack_rows)
from .readers import read_rows
from .template import PromptTemplate
from .tokenize import generation_prompt_ids, tokenize_conversation, tokenize_text


def bundled_data_path(name: str = "instructions.jsonl") -> str:
    """Path of a bundled demo file: instructions.jsonl, conversations.jsonl or corpus.txt."""
    return str(files("fasttune") / "assets" / "data" / name)


def tiny_tokenizer_path() -> str:
    """Folder of the shipped tiny model's tokenizer (loadable with AutoTokenizer.from_pretrained)."""
    return str(files("fasttune") / "assets" / "tiny")


__all__ = [
    "CHAT_TEMPLATES", "ChatTemplate", "DataCollator", "DataError", "DataSplits", "DataStats", "IGNORE_INDEX",
    "Location", "PromptTemplate", "StreamingExamples", "TemplateError", "build_dataset", "bundled_data_path",
    "bucket_length", "collate_packed", "collate_packed_rows", "collate_padded", "length_buckets", "pack_rows", "generation_prompt_ids", "get_chat_template", "iter_batches",
    "length_grouped_batches", "num_target_tokens", "pack_examples", "read_rows", "register_chat_template",
    "standardize_conversation", "tiny_tokenizer_path", "tokenize_conversation", "tokenize_text",
]
