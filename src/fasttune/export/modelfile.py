"""Ollama Modelfile from a chat template: FROM, TEMPLATE (Go text/template over Ollama's `.Messages`),
PARAMETER stop for the end-of-turn markers, and an optional SYSTEM.

Each registry template (fasttune.data.chat_templates) has a hand-written Go twin below that renders the same text
as the Jinja source for a conversation ending in a user turn with add_generation_prompt=True (Ollama always
prompts the assistant next), minus the BOS token, which llama.cpp adds itself from the GGUF's add_bos flag.
Ollama's convention of leaving a final assistant turn open (so a reply can be continued) is kept: its end marker
is written only when it is not the last message. `{eos}` in a Go template is replaced by the tokenizer's EOS text.

`export_chat_template` decides the one template an export writes everywhere (GGUF tokenizer.chat_template, the
Modelfile TEMPLATE, the tokenizer's chat_template.jinja): the user's --chat-template, else the one the run trained
with (fasttune_adapter.json `chat_template`), else the tokenizer's own.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..adapters.files import RUN_RECORD
from ..data.chat_templates import TEMPLATES, get_chat_template
from ..data.errors import DataError

_LAST = '{{ $last := eq (len (slice $.Messages $i)) 1 }}'

GO_TEMPLATES: dict[str, str] = {
    "llama-3": (
        '{{ range $i, $_ := .Messages }}' + _LAST +
        '<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}'
        '{{ if or (not $last) (ne .Role "assistant") }}<|eot_id|>{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
        '{{ end }}'),
    "chatml": (
        '{{ range $i, $_ := .Messages }}' + _LAST +
        '<|im_start|>{{ .Role }}\n{{ .Content }}'
        '{{ if or (not $last) (ne .Role "assistant") }}<|im_end|>\n{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}'
        '{{ end }}'),
    "phi-3": (
        '{{ range $i, $_ := .Messages }}' + _LAST +
        '<|{{ .Role }}|>\n{{ .Content }}'
        '{{ if or (not $last) (ne .Role "assistant") }}<|end|>\n{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|assistant|>\n{{ end }}'
        '{{ end }}'),
    "zephyr": (
        '{{ range $i, $_ := .Messages }}' + _LAST +
        '<|{{ .Role }}|>\n{{ .Content }}'
        '{{ if or (not $last) (ne .Role "assistant") }}{eos}\n{{ end }}'
        '{{ if and $last (ne .Role "assistant") }}<|assistant|>\n{{ end }}'
        '{{ end }}'),
    # system text goes into the first user turn (index 1 when a system message leads)
    "mistral": (
        '{{ range $i, $_ := .Messages }}' + _LAST +
        '{{ if eq .Role "user" }}[INST] {{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}'
        '{{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}{eos}{{ end }}{{ end }}'
        '{{ end }}'),
    "gemma": (
        '{{ range $i, $_ := .Messages }}' + _LAST +
        '{{ if eq .Role "user" }}<start_of_turn>user\n{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}'
        '{{ .Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}'
        '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
        '{{ if not $last }}<end_of_turn>\n{{ end }}{{ end }}'
        '{{ end }}'),
    "alpaca": (
        '{{ if $.System }}{{ $.System }}{{ else }}Below is an instruction that describes a task. Write a response '
        'that appropriately completes the request.{{ end }}\n\n'
        '{{ range $i, $_ := .Messages }}' + _LAST +
        '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n{{ if $last }}### Response:\n{{ end }}'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}{{ if not $last }}{eos}\n\n{{ end }}{{ end }}'
        '{{ end }}'),
    "vicuna": (
        "{{ if $.System }}{{ $.System }}{{ else }}A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.{{ end }} "
        '{{ range $i, $_ := .Messages }}' + _LAST +
        '{{ if eq .Role "user" }}USER: {{ .Content }} {{ if $last }}ASSISTANT:{{ end }}'
        '{{ else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}{{ if not $last }}{eos}{{ end }}{{ end }}'
        '{{ end }}'),
}

# text that starts the next turn in the plain-text formats: stop there too, in case the model skips EOS
EXTRA_STOPS = {"alpaca": ["### Instruction:"], "vicuna": ["USER:"], "zephyr": ["<|user|>"],
               "chatml": ["<|im_start|>"], "llama-3": ["<|start_header_id|>"], "gemma": ["<start_of_turn>"],
               "phi-3": ["<|user|>"]}
# markers that identify a tokenizer's own Jinja template as one of the registry formats
_SIGNATURES = [("<|start_header_id|>", "llama-3"), ("<|im_start|>", "chatml"), ("<start_of_turn>", "gemma"),
               ("[INST]", "mistral"), ("<|end|>", "phi-3"), ("### Instruction:", "alpaca"), ("ASSISTANT:", "vicuna")]


class ModelfileError(ValueError):
    pass


def registry_name_for(jinja_source: str) -> str | None:
    """The registry format a tokenizer's Jinja chat template follows, recognised by its markers (or None)."""
    for marker, name in _SIGNATURES:
        if marker in jinja_source:
            return name
    return None


def go_template(template: str, eos_token: str) -> str:
    """The Go template for a registry template name (or alias)."""
    name = TEMPLATES[template].name if template in TEMPLATES else template
    if name not in GO_TEMPLATES:
        raise ModelfileError(f"no Ollama template for chat template {template!r}; known: {', '.join(GO_TEMPLATES)}")
    return GO_TEMPLATES[name].replace("{eos}", eos_token)


def stop_tokens(template: str, eos_token: str) -> list[str]:
    tpl = get_chat_template(template)
    stops = [s for s in [tpl.stop_text(eos_token), eos_token] if s]
    stops += EXTRA_STOPS.get(tpl.name, [])
    return list(dict.fromkeys(stops))


def _quote(text: str, what: str) -> str:
    if '"""' in text:
        raise ModelfileError(f'the {what} contains """, which a Modelfile cannot quote')
    return '"""' + text + '"""'


def make_modelfile(from_path: str, template: str | None = None, eos_token: str = "</s>", system: str | None = None,
                   jinja_source: str | None = None, parameters: dict[str, object] | None = None) -> str:
    """Modelfile text. `template` is a registry name; without one, `jinja_source` (the tokenizer's template) is
    recognised by its markers. Raises ModelfileError when neither identifies a known format."""
    if template is None and jinja_source is not None:
        template = registry_name_for(jinja_source)
    if template is None:
        raise ModelfileError("cannot tell which chat format to write for Ollama: pass --chat-template with one of "
                             + ", ".join(GO_TEMPLATES))
    lines = [f"FROM {from_path}", "", f"TEMPLATE {_quote(go_template(template, eos_token), 'template')}", ""]
    for stop in stop_tokens(template, eos_token):
        lines.append(f'PARAMETER stop "{stop}"')
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    if system:
        lines += ["", f"SYSTEM {_quote(system, 'system prompt')}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ExportTemplate:
    source: str | None         # Jinja source written to the GGUF and the tokenizer files (None: the tokenizer has none)
    registry_name: str | None  # the registry format the Modelfile's Go template is for (None: not recognised)
    origin: str                # "--chat-template", "the run's fasttune_adapter.json", "the tokenizer", "none"


def export_chat_template(override: str | None, record: dict | str | os.PathLike | None,
                         tokenizer) -> ExportTemplate:
    """The chat template an export must use. `override` (a registry name, "tokenizer" or Jinja source) wins; else
    the template the run trained with: `record` is what the trained-weights folder records (build.adapter_meta's
    dict, or the folder itself, whose fasttune_adapter.json is read), where a null `chat_template`
    means what training used: the tokenizer's own template, or ChatML when it has none
    (data.chat_templates.chat_template_for). A PEFT adapter (kind "peft") or no record: the tokenizer's own."""
    name, origin = override, "--chat-template"
    if isinstance(record, (str, os.PathLike)):
        meta_file = Path(record) / RUN_RECORD
        try:
            record = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else None
        except (OSError, ValueError) as e:
            raise ModelfileError(f"{meta_file} is not readable JSON ({e}); pass --chat-template to choose the "
                                 "export's chat template") from None
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(own, dict):
        own = own.get("default")
    if name is None and record is not None and record.get("kind", "run") in ("run", "checkpoint"):
        name = record.get("chat_template") or (None if own else "chatml")
        origin = "the run's record (chat_template)"
    if name is None:
        return ExportTemplate(own, registry_name_for(own), "the tokenizer") if own else \
            ExportTemplate(None, None, "none")
    try:
        tpl = get_chat_template(name, tokenizer)
    except DataError as e:
        raise ModelfileError(f"chat template from {origin}: {e}") from None
    registry = tpl.name if tpl.name in GO_TEMPLATES else registry_name_for(tpl.source)
    return ExportTemplate(tpl.source, registry, origin)
