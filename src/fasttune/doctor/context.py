"""What the checks look at: one model folder, read lazily.

Shapes and dtypes come from the safetensors headers, read and validated here (a header that declares more bytes
than the file holds is a truncated download, found without reading any data); tensors are then opened with
safetensors' `safe_open` and read one at a time, so the doctor runs on checkpoints far larger than memory.
The tokenizer, the parsed `ArchSpec` and the data sample are loaded on first use and their failures kept as text,
so one broken part does not stop the checks of the others."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from ..data.chat_templates import ChatTemplate, ChatTemplateLimitError
from ..models.spec import ArchSpec

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

# A conversation every chat template should render: system, two user turns, one assistant turn.
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
]
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system",
                 "user": "user", "assistant": "assistant"}


@dataclass
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # torch spelling: "bfloat16", "float32", ...


class CorruptWeightsError(ValueError):
    """A safetensors file that no loader can read (truncated, bad header)."""


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """The tensors a safetensors file declares, checked against the file's size: a header or tensor data that runs
    past the end (a truncated download or copy) or offsets that do not add up raise CorruptWeightsError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptWeightsError(f"{size} bytes: too short to hold a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES:
            raise CorruptWeightsError(f"the header declares {n:,} bytes (safetensors allows {_MAX_HEADER_BYTES:,}): "
                                      "not a safetensors file, or a corrupt one")
        if 8 + n > size:
            raise CorruptWeightsError(f"truncated: the header declares {n:,} bytes, the file has {size:,} in all")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptWeightsError(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptWeightsError("the header is not a JSON object")
    data_bytes = size - 8 - n
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptWeightsError(f"tensor {name!r} has a malformed header entry: {str(entry)[:200]}") from None
        numel = 1
        for d in shape:
            numel *= d
        if dtype in _DTYPE_BYTES and end - start != numel * _DTYPE_BYTES[dtype]:
            raise CorruptWeightsError(f"tensor {name!r} {dtype}{shape} needs {numel * _DTYPE_BYTES[dtype]:,} bytes, "
                                      f"its offsets span {end - start:,}")
        if end > data_bytes:
            raise CorruptWeightsError(f"truncated: tensor {name!r} ends at byte {8 + n + end:,} of the file, "
                                      f"which has {size:,} bytes")
        out.append(TensorInfo(name, path, tuple(shape), SAFETENSORS_DTYPES.get(dtype, str(dtype).lower())))
    return out


def _gguf_as_folder(path: Path) -> Path:
    """A GGUF written out as a temporary Hugging Face folder (removed at exit), so every folder check applies."""
    import atexit
    import shutil
    import tempfile

    import torch

    from ..models.gguf_reader import gguf_to_hf_folder

    tmp = Path(tempfile.mkdtemp(prefix="fasttune-doctor-gguf-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return gguf_to_hf_folder(path, tmp / path.stem, dtype=torch.bfloat16)


def _resolve(path: str | os.PathLike) -> Path:
    """A local folder or file as it is; a Hub repo id ("org/name") from the Hugging Face cache, else downloaded
    unless HF_HUB_OFFLINE: the resolution fasttune.load uses (models.checkpoint.resolve_pretrained)."""
    from ..models.checkpoint import CheckpointError, resolve_pretrained

    try:
        return resolve_pretrained(path)
    except CheckpointError as e:
        raise FileNotFoundError(str(e)) from None


class ModelFolder:
    def __init__(self, path: str | os.PathLike, data: str | os.PathLike | None = None, max_data_rows: int = 1000,
                 dtype: str | None = None):
        self.path = _resolve(path)
        # the dtype the model is meant to be trained / run in (None: not said; the checks then go by the config)
        self.dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
        self.notes: list[str] = []  # what could not be examined, for the report
        if self.path.suffix == ".gguf" and self.path.is_file():
            self.path = _gguf_as_folder(self.path)
            self.notes.append(f"{path} is a GGUF file: examined as the Hugging Face folder it converts to "
                              "(bf16 weights, its tokenizer and chat template)")
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a folder: point `fasttune doctor` at a Hugging Face model "
                                    "folder, a GGUF file or a Hub repo id (org/name)")
        cfg_file = self.path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"no config.json in {self.path}: point `fasttune doctor` at a Hugging Face model folder")
        self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        self.data = Path(data) if data is not None else None
        self.max_data_rows = max_data_rows
        # unreadable weight files -> why (filled by `tensors`); their tensors' data is never read
        self.weight_errors: dict[Path, str] = {}

    # ---- config ------------------------------------------------------------------------------------------------
    @cached_property
    def spec_or_error(self) -> tuple[ArchSpec | None, str | None]:
        try:
            return ArchSpec.from_hf_config(self.config), None
        except Exception as e:  # noqa: BLE001 - reported as a finding
            return None, f"{type(e).__name__}: {e}"

    @property
    def spec(self) -> ArchSpec | None:
        return self.spec_or_error[0]

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    @cached_property
    def generation_config(self) -> dict[str, Any]:
        f = self.path / "generation_config.json"
        return json.loads(f.read_text()) if f.exists() else {}

    # ---- tensors -----------------------------------------------------------------------------------------------
    @cached_property
    def weight_index(self) -> dict[str, str] | None:
        """model.safetensors.index.json's weight_map (tensor -> shard file name), None without an index."""
        index = self.path / "model.safetensors.index.json"
        if not index.exists():
            return None
        return json.loads(index.read_text())["weight_map"]

    @cached_property
    def weight_files(self) -> list[Path]:
        if self.weight_index is not None:
            names = sorted(set(self.weight_index.values()))
            return [self.path / n for n in names if (self.path / n).exists()]
        return sorted(self.path.glob("*.safetensors"))

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Name -> shape/dtype/file, from the safetensors headers only; files that cannot be read are left out
        and listed in `weight_errors`."""
        out: dict[str, TensorInfo] = {}
        for f in self.weight_files:
            try:
                infos = read_safetensors_header(f)
                with safe_open(str(f), framework="pt"):  # whatever else safetensors refuses (overlapping offsets)
                    pass
            except Exception as e:  # noqa: BLE001 - reported by the weights-corrupt check
                self.weight_errors[f] = str(e) if isinstance(e, CorruptWeightsError) else f"{type(e).__name__}: {e}"
                continue
            out.update((i.name, i) for i in infos)
        return out

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt") as h:
            return h.get_tensor(name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the readable files, one at a time, file by file (each file opened once)."""
        readable = {i.file for i in self.tensors.values()}
        for f in self.weight_files:
            if f not in readable:
                continue
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    yield name, h.get_tensor(name)

    @property
    def has_lm_head(self) -> bool:
        return LM_HEAD in self.tensors

    # ---- tokenizer ---------------------------------------------------------------------------------------------
    @cached_property
    def tokenizer_or_error(self) -> tuple[Any, str | None]:
        if not any((self.path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return None, "no tokenizer files (tokenizer.json / tokenizer.model / vocab.json) in the folder"
        try:
            from transformers import AutoTokenizer

            # A light config (the model type alone): AutoTokenizer otherwise validates the whole config.json, and
            # a config mistake (a RoPE block without its factor, hidden_size not divisible by the heads) would be
            # reported as a tokenizer that does not load; the config checks report those.
            return AutoTokenizer.from_pretrained(str(self.path), local_files_only=True,
                                                 config=_light_config(self.config.get("model_type"))), None
        except Exception as e:  # noqa: BLE001 - reported as a finding
            return None, f"{type(e).__name__}: {e}"

    @property
    def tokenizer(self):
        return self.tokenizer_or_error[0]

    @property
    def chat_template(self) -> str | None:
        tok = self.tokenizer
        t = getattr(tok, "chat_template", None) if tok is not None else None
        if isinstance(t, dict):  # named templates: the default one
            t = t.get("default") or next(iter(t.values()), None)
        return t

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat through the tokenizer's template, rendered as training renders it: bounded in time and size
        (a runaway template raises ChatTemplateLimitError), with the tokenizer's special tokens as variables as
        transformers' apply_chat_template passes them."""
        tok = self.tokenizer
        special = {k: v for k, v in getattr(tok, "special_tokens_map", {}).items() if isinstance(v, str)}
        special.update(bos_token=tok.bos_token, eos_token=tok.eos_token)
        return ChatTemplate("tokenizer", self.chat_template, None).render(
            messages, add_generation_prompt=add_generation_prompt, **special)

    @cached_property
    def rendered_sample(self) -> tuple[str | None, str | None]:
        """(text of SAMPLE_CONVERSATION through the chat template, error). Retries without the system turn,
        which several templates (Gemma) reject on purpose."""
        if self.tokenizer is None or not self.chat_template:
            return None, None
        try:
            return self.render_chat(SAMPLE_CONVERSATION), None
        except ChatTemplateLimitError as e:  # not retried: it would run out its bounds again
            return None, str(e)
        except Exception as e:  # noqa: BLE001
            try:
                return self.render_chat(SAMPLE_CONVERSATION[1:]), None
            except Exception as e2:  # noqa: BLE001
                return None, f"{type(e2).__name__}: {e2} (with a system turn: {type(e).__name__}: {e})"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # ---- data --------------------------------------------------------------------------------------------------
    @cached_property
    def data_token_ids(self) -> tuple[list[list[int]], str | None]:
        """Token ids of the first `max_data_rows` rows of --data, as training would see them: conversations
        through the chat template, other rows as their text fields joined by newlines."""
        if self.data is None or self.tokenizer is None:
            return [], None
        try:
            from ..data.readers import read_rows

            out: list[list[int]] = []
            for i, (_loc, row) in enumerate(read_rows(str(self.data))):
                if i >= self.max_data_rows:
                    break
                messages = _as_messages(row)
                if messages is not None and self.chat_template:
                    try:
                        out.append(self.encode(self.render_chat(messages), add_special_tokens=False))
                        continue
                    except ChatTemplateLimitError:  # the chat-template check reports it; one render is enough
                        raise
                    except Exception:  # noqa: BLE001 - fall back to the plain text of the row
                        pass
                text = "\n".join(_strings(row))
                out.append(self.encode(text, add_special_tokens=True))
            return out, None
        except Exception as e:  # noqa: BLE001
            return [], f"{type(e).__name__}: {e}"


def _light_config(model_type: str | None):
    from transformers import AutoConfig, PretrainedConfig

    try:
        return AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - a model type transformers does not know: no type-specific tokenizer rules
        return PretrainedConfig()


def _as_messages(row: dict) -> list[dict] | None:
    turns = row.get("messages") or row.get("conversations")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        return None
    messages = []
    for t in turns:
        role = _ROLE_ALIASES.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
