"""Chat templates: a registry of well-known formats, or the tokenizer's own `chat_template`, rendered in a
sandboxed Jinja environment (a template is code; one from a downloaded tokenizer must not reach Python internals).

Templates see `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`. Registry templates
write `bos_token` where the original format has one; the tokenising step (tokenize.py) then makes sure BOS appears
exactly once, however the template and tokenizer handle it. Every assistant turn ends with the template's
`end_of_turn` marker (EOS or the format's end-of-turn token), which is trained on so the model learns to stop.

Rendering is bounded, because a template is untrusted code that runs once per row: time (MAX_RENDER_SECONDS),
loop iterations (MAX_LOOP_WORK over the template's length), the size of any string, list or integer it builds
(checked before the operation that would build it), and the text it writes. A template over a bound fails with a
ChatTemplateLimitError naming the template; it is never retried or skipped row by row.
"""
from __future__ import annotations

import json
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import DataError

MAX_RENDER_SECONDS = 10.0
MAX_TEXT_CHARS = 64 * 2**20  # any one string a template builds, and the rendered text
MAX_WRITTEN_CHARS = 256 * 2**20  # all text written by one render, captured blocks and macro output included
MAX_ITEMS = 2**20  # elements of a list or tuple a template builds
MAX_INT_BITS = 2**16  # integers a template builds (2 ** 10 ** 9 would take minutes)
# loop iterations x template length per render: a loop body's constant text is written on every iteration
MAX_LOOP_WORK = 2**28
MIN_LOOP_ITERATIONS, MAX_LOOP_ITERATIONS = 10_000, 2**20
MAX_JSON_INDENT = 64
_DIGITS = re.compile(r"\d+")


class ChatTemplateLimitError(DataError):
    """A chat template went over a rendering bound: the template is the problem, not a row of data."""


class _LimitExceeded(Exception):
    """Raised inside rendering (not a Jinja or Python error type, so nothing in Jinja catches it on the way out)."""


@dataclass
class _Budget:
    deadline: float
    iterations_left: int
    written: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"ran longer than {MAX_RENDER_SECONDS:g} s")


_BUDGET: ContextVar[_Budget | None] = ContextVar("fasttune_chat_template_budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:  # None while Jinja folds constants at compile time: only the size checks apply there
        budget.tick()


def _too_big(what: str, size: int, limit: int, unit: str = "characters") -> _LimitExceeded:
    return _LimitExceeded(f"builds {what} of {size:,} {unit} (limit {limit:,})")


def _check_result(value):
    if isinstance(value, (str, bytes)) and len(value) > MAX_TEXT_CHARS:
        raise _too_big("a string", len(value), MAX_TEXT_CHARS)
    if isinstance(value, (list, tuple)) and len(value) > MAX_ITEMS:
        raise _too_big("a list", len(value), MAX_ITEMS, "items")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _too_big("an integer", value.bit_length(), MAX_INT_BITS, "bits")
    return value


def _sequence(seq, size: int) -> tuple[str, int, int, str]:
    return ("a string", size, MAX_TEXT_CHARS, "characters") if isinstance(seq, str) else \
        ("a list", size, MAX_ITEMS, "items")


def _check_int_args(args, kwargs) -> None:
    """No width, count or repeat argument that could build more than the text limit (center(10**9), ...)."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEXT_CHARS:
            raise _LimitExceeded(f"passes a width or count of {abs(v):,} (limit {MAX_TEXT_CHARS:,})")


def _check_format(fmt: str) -> None:
    """'%01000000000d' % 1 and '{:>1000000000}'.format(1) build a gigabyte from a short format."""
    for run in _DIGITS.findall(fmt):
        if len(run) > 9 or int(run) > MAX_TEXT_CHARS:
            raise _too_big("a formatted field", int(run[:19]), MAX_TEXT_CHARS)


def _text_size(value) -> int:
    return len(value) if isinstance(value, str) else 0


def _predicted_size(name: str, text: str, args, kwargs) -> int:
    """Length of what `text.<name>(*args)` (a str method, or the filter of that name) would return, for the
    operations whose output can be far larger than their input; 0 when not one of them."""
    first = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int):
        return max(len(text), first)
    if name == "expandtabs":
        size = first if isinstance(first, int) else kwargs.get("tabsize", 8)
        return len(text) + text.count("\t") * max(0, size if isinstance(size, int) else 8)
    if name == "indent":  # the filter: indent(s, width=4, ...), width an int or a string
        width = first if first is not None else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(text) + (text.count("\n") + 1) * max(0, per_line)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        hits = text.count(old) if old else len(text) + 1
        return len(text) + hits * max(0, len(new) - len(old))
    if name in ("format", "format_map"):
        _check_format(text)
    return 0


def _join_size(items, sep) -> int:
    if not isinstance(items, (list, tuple)):
        return 0  # an iterator: its items come from loops and calls that are themselves bounded
    return sum(_text_size(x) for x in items) + _text_size(sep) * max(0, len(items) - 1)


def _bounded_filter(name: str, f):
    @wraps(f)  # keeps Jinja's pass_context / pass_eval_context markers
    def bounded(*args, **kwargs):
        _tick()
        _check_int_args(args, kwargs)
        values = [a for a in args if not _is_jinja_context(a)]
        if name == "join" and values:
            sep = values[1] if len(values) > 1 else kwargs.get("d", "")
            size = _join_size(values[0], sep)
        elif values and isinstance(values[0], str):
            size = _predicted_size(name, values[0], values[1:], kwargs)
        else:
            size = 0
        if size > MAX_TEXT_CHARS:
            raise _too_big(f"a string (filter {name!r})", size, MAX_TEXT_CHARS)
        return _check_result(f(*args, **kwargs))

    return bounded


def _is_jinja_context(value) -> bool:
    return type(value).__name__ in ("Context", "EvalContext", "Environment") or \
        isinstance(value, ImmutableSandboxedEnvironment)


class _LoopCountingCodeGenerator(CodeGenerator):
    """Compiles every `{% for %}` to iterate through `environment.bounded_iter(...)`, so loop iterations are
    counted even when the body calls nothing (a double range(100000) loop with an empty body)."""

    def visit_Template(self, node, frame=None):
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        return super().visit_Template(node, frame)

    def visit_Concat(self, node, frame):  # `a ~ b`: checked before it is joined (Jinja's own str_join is not)
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _LoopCountingCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **kwargs):
        super().__init__(finalize=self._written, **kwargs)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def _written(value):
        """Every expression a template outputs passes here (captured `{% set %}` blocks and macros included)."""
        text = value if isinstance(value, str) else str(value)
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
            budget.written += len(text)
            if budget.written > MAX_WRITTEN_CHARS:
                raise _LimitExceeded(f"writes more than {MAX_WRITTEN_CHARS:,} characters")
        return _check_result(text)

    def bounded_iter(self, iterable):
        budget = _BUDGET.get()
        for item in iterable:
            if budget is not None:
                budget.iterations_left -= 1
                if budget.iterations_left < 0:
                    raise _LimitExceeded("runs too many loop iterations")
                budget.tick()
            yield item

    @staticmethod
    def bounded_concat(parts) -> str:
        _tick()
        texts = [p if isinstance(p, str) else str(p) for p in parts]
        size = sum(map(len, texts))
        if size > MAX_TEXT_CHARS:
            raise _too_big("a string", size, MAX_TEXT_CHARS)
        return "".join(texts)

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
                limit = MAX_TEXT_CHARS if isinstance(seq, str) else MAX_ITEMS
                if len(seq) * max(n, 0) > limit:
                    raise _too_big(*_sequence(seq, len(seq) * n))
            elif isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _too_big("an integer", left.bit_length() + right.bit_length(), MAX_INT_BITS, "bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > (MAX_TEXT_CHARS if isinstance(left, str) else MAX_ITEMS):
                raise _too_big(*_sequence(left, len(left) + len(right)))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * left.bit_length() > MAX_INT_BITS:
                raise _too_big("an integer", right * left.bit_length(), MAX_INT_BITS, "bits")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_int_args(right if isinstance(right, tuple) else (right,), {})
        return _check_result(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        _tick()
        if __obj is not __self.globals.get("range"):  # range is bounded by the sandbox (MAX_RANGE)
            _check_int_args(args, kwargs)
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            size = _join_size(args[0], owner) if name == "join" and args else \
                _predicted_size(name, owner, args, kwargs)
            if size > MAX_TEXT_CHARS:
                raise _too_big(f"a string (str.{name})", size, MAX_TEXT_CHARS)
        return _check_result(super().call(__context, __obj, *args, **kwargs))


def _raise_exception(message: str):
    raise JinjaTemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= MAX_JSON_INDENT):
        raise _LimitExceeded(f"asks tojson for indent {indent!r} (limit {MAX_JSON_INDENT})")
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def _compile(source: str):
    # trim_blocks/lstrip_blocks match how transformers renders tokenizer chat templates
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except JinjaTemplateError as e:
        raise DataError(f"chat template does not compile: {e}") from None
    except RecursionError:
        raise DataError("chat template does not compile: it is nested too deeply (RecursionError)") from None


def _loop_budget(source: str) -> int:
    return max(MIN_LOOP_ITERATIONS, min(MAX_LOOP_ITERATIONS, MAX_LOOP_WORK // max(1, len(source))))


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
               eos_token: str | None = "", **variables) -> str:
        """The rendered text; `variables` are further names the template may read (e.g. pad_token, tools).
        Raises DataError when the template fails, ChatTemplateLimitError when it goes over a rendering bound."""
        template = _compile(self.source)
        token = _BUDGET.set(_Budget(time.monotonic() + MAX_RENDER_SECONDS, _loop_budget(self.source)))
        try:
            text = template.render(**variables, messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos_token or "", eos_token=eos_token or "")
            return _check_result(text)
        except _LimitExceeded as e:
            raise ChatTemplateLimitError(f"chat template {self.name!r} {e}",
                                         hint="the template is at fault, not the data: use a registered chat "
                                              "template (data.chat_template) or repair this one") from None
        except RecursionError:
            raise ChatTemplateLimitError(f"chat template {self.name!r} recurses without end (RecursionError)",
                                         hint="repair the template's recursive macro or loop, or use a registered "
                                              "chat template (data.chat_template)") from None
        except MemoryError:
            raise ChatTemplateLimitError(f"chat template {self.name!r} ran out of memory while rendering",
                                         hint="use a registered chat template (data.chat_template)") from None
        except JinjaTemplateError as e:
            raise DataError(f"chat template {self.name!r} failed to render: {e}") from None
        except (TypeError, ValueError, LookupError, OverflowError, ArithmeticError, AttributeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"chat template {self.name!r} failed to render: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.reset(token)


_SPLIT_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
                 "{% set loop_messages = messages %}{% endif %}")
_ROLE_CHECK = ("{% if message['role'] not in ['user', 'assistant'] %}"
               "{{ raise_exception(\"this template supports system (first turn only), user and assistant roles\") }}"
               "{% endif %}")


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


def chat_template_for(tokenizer, name: str | None) -> ChatTemplate:
    """The template a run formats with (training, chat, generate, export): `name`, else the tokenizer's own, else
    ChatML for a base model without one."""
    if name is None and not getattr(tokenizer, "chat_template", None):
        name = "chatml"  # base models without a template: ChatML as plain text
    return get_chat_template(name, tokenizer)
