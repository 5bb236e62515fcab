"""Chat templates: a registry of well-known formats, or the tokenizer's own `chat_template`, rendered in a
sandboxed Jinja environment (a template is code; one from a downloaded tokenizer must not reach Python internals).

Templates see `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`. Registry templates
write `bos_token` where the original format has one; the tokenising step (tokenize.py) then makes sure BOS appears
exactly once, however the template and tokenizer handle it. Every assistant turn ends with the template's
`end_of_turn` marker (EOS or the format's end-of-turn token), which is trained on so the model learns to stop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import DataError

_SPLIT_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
                 "{% set loop_messages = messages %}{% endif %}")
_ROLE_CHECK = ("{% if message['role'] not in ['user', 'assistant'] %}"
               "{{ raise_exception(\"this template supports system (first turn only), user and assistant roles\") }}"
               "{% endif %}")


def _raise_exception(message: str):
    raise JinjaTemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def _compile(source: str):
    # trim_blocks/lstrip_blocks match how transformers renders tokenizer chat templates
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except JinjaTemplateError as e:
        raise DataError(f"chat template does not compile: {e}") from None


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    end_of_turn: str | None  # text closing each assistant turn; "{eos}" means the tokenizer's eos_token

    def stop_text(self, eos_token: str | None) -> str | None:
        if self.end_of_turn is None:
            return None
        return self.end_of_turn.replace("{eos}", eos_token or "")

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, bos_token: str | None = "",
               eos_token: str | None = "") -> str:
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token or "", eos_token=eos_token or "")
        except JinjaTemplateError as e:
            raise DataError(f"chat template {self.name!r} failed to render: {e}") from None


TEMPLATES: dict[str, ChatTemplate] = {}


def register_chat_template(name: str, source: str, end_of_turn: str | None, aliases: tuple[str, ...] = ()) -> None:
    _compile(source)  # fail at registration, not at the first row
    for key in (name, *aliases):
        TEMPLATES[key] = ChatTemplate(name, source, end_of_turn)


register_chat_template(
    "llama-3",
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "<|eot_id|>", aliases=("llama3", "llama-3.1", "llama-3.2"))
register_chat_template(
    "chatml",
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "<|im_end|>", aliases=("qwen", "qwen2", "qwen2.5", "qwen-2.5"))
register_chat_template(
    "mistral",
    "{{ bos_token }}" + _SPLIT_SYSTEM + "{% for message in loop_messages %}" + _ROLE_CHECK +
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system + '\\n\\n' if loop.first and system else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}",
    "{eos}")
register_chat_template(
    "gemma",
    "{{ bos_token }}" + _SPLIT_SYSTEM + "{% for message in loop_messages %}" + _ROLE_CHECK +
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + (system + '\\n\\n' if loop.first and system else '') + message['content'] "
    "+ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
    "<end_of_turn>", aliases=("gemma-2", "gemma2", "gemma-3"))
register_chat_template(
    "phi-3",
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    "<|end|>", aliases=("phi3", "phi-3.5"))
register_chat_template(
    "alpaca",
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% else %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n' }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
    "{eos}")
register_chat_template(
    "vicuna",
    "{{ bos_token }}" + _SPLIT_SYSTEM +
    "{{ (system if system else 'A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user\\'s questions.') + ' ' }}"
    "{% for message in loop_messages %}" + _ROLE_CHECK +
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
    "{eos}")
register_chat_template(
    "zephyr",
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    "{eos}")

REGISTERED = ("llama-3", "chatml", "qwen", "mistral", "gemma", "phi-3", "alpaca", "vicuna", "zephyr")


def get_chat_template(name: str | None, tokenizer=None) -> ChatTemplate:
    """A registered name ("llama-3", "chatml"/"qwen", "mistral", "gemma", "phi-3", "alpaca", "vicuna", "zephyr"),
    None or "tokenizer" for the tokenizer's own `chat_template`, or a Jinja source string."""
    if name is None or name == "tokenizer":
        source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(source, dict):  # some tokenizers ship several named templates
            source = source.get("default")
        if not source:
            raise DataError("the tokenizer has no chat_template", available=REGISTERED,
                            hint="pass chat_template= one of the registered names")
        return ChatTemplate("tokenizer", source, None)
    if name in TEMPLATES:
        return TEMPLATES[name]
    if "{{" in name or "{%" in name:
        _compile(name)
        return ChatTemplate("custom", name, None)
    raise DataError(f"unknown chat template {name!r}", column="chat_template", available=REGISTERED + ("tokenizer",),
                    hint="or pass a Jinja template string")
