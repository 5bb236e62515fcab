"""Ollama Modelfiles: every registry chat template's Go twin renders what the Jinja template renders.

There is no Go here, so `render_go` below is a small interpreter of the text/template subset the Modelfiles use
(range with index/element variables, if / else if / else, := assignment, eq ne and or not len slice, $.Field,
.Field, string and integer literals, trim markers), fed the data Ollama gives a template: .Messages (role and
content of every message, system ones included), .System (the system messages' text)."""
from __future__ import annotations

import re

import pytest

from fasttune.data.chat_templates import TEMPLATES
from fasttune.export.modelfile import GO_TEMPLATES, ModelfileError, make_modelfile, registry_name_for

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _parse(src: str):
    parts, pos = [], 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if parts and parts[-1][0] == "trim_next":
            parts.pop()
            text = text.lstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2)))
        if m.group(3):
            parts.append(("trim_next", None))
        pos = m.end()
    text = src[pos:]
    if parts and parts[-1][0] == "trim_next":
        parts.pop()
        text = text.lstrip()
    parts.append(("text", text))

    def block(i):  # -> (nodes, index, terminator)
        nodes = []
        while i < len(parts):
            kind, val = parts[i]
            i += 1
            if kind == "text":
                nodes.append(("text", val))
            elif val == "end" or val == "else" or val.startswith("else if "):
                return nodes, i, val
            elif val.startswith("range "):
                body, i, term = block(i)
                assert term == "end"
                nodes.append(("range", val[6:], body))
            elif val.startswith("if "):
                branches = []
                cond = val[3:]
                while True:
                    body, i, term = block(i)
                    branches.append((cond, body))
                    if term == "end":
                        break
                    cond = term[8:] if term.startswith("else if ") else None
                nodes.append(("if", branches))
            else:
                nodes.append(("expr", val))
        return nodes, i, None

    return block(0)[0]


def _tokens(expr: str):
    return re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+', expr)


def _eval(expr, dot, env):
    toks = _tokens(expr)

    def operand(i):
        t = toks[i]
        if t == "(":
            vals, i = command(i + 1)
            return vals, i + 1  # skip ")"
        if t.startswith('"'):
            return t[1:-1].replace('\\"', '"').replace("\\n", "\n"), i + 1
        if re.fullmatch(r"-?\d+", t):
            return int(t), i + 1
        if t.startswith("$."):
            return env["$"][t[2:]], i + 1
        if t.startswith("$"):
            return env[t], i + 1
        if t.startswith("."):
            return dot[t[1:]], i + 1
        return ("func", t), i + 1

    def call(name, args):
        if name == "eq":
            return args[0] == args[1]
        if name == "ne":
            return args[0] != args[1]
        if name == "not":
            return not args[0]
        if name == "len":
            return len(args[0])
        if name == "slice":
            return args[0][args[1]:]
        if name == "and":
            for a in args:
                if not a:
                    return a
            return args[-1]
        if name == "or":
            for a in args:
                if a:
                    return a
            return args[-1]
        raise AssertionError(f"unsupported function {name}")

    def command(i):
        vals = []
        while i < len(toks) and toks[i] != ")":
            v, i = operand(i)
            vals.append(v)
        if isinstance(vals[0], tuple) and vals[0][0] == "func":
            return call(vals[0][1], vals[1:]), i
        assert len(vals) == 1, expr
        return vals[0], i

    return command(0)[0]


def _run(nodes, dot, env, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            m = re.fullmatch(r"(\$\w+)\s*:=\s*(.*)", node[1], re.S)
            if m:
                env[m.group(1)] = _eval(m.group(2), dot, env)
            else:
                out.append(str(_eval(node[1], dot, env)))
        elif node[0] == "range":
            m = re.fullmatch(r"(\$\w+),\s*(\$\w+)\s*:=\s*(.*)", node[1])
            for i, item in enumerate(_eval(m.group(3), dot, env)):
                scope = dict(env, **{m.group(1): i, m.group(2): item})
                _run(node[2], item, scope, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or _eval(cond, dot, env):
                    _run(body, dot, env, out)
                    break


def render_go(src: str, messages: list[dict]) -> str:
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"Messages": msgs, "System": system}
    out: list[str] = []
    _run(_parse(src), data, {"$": data}, out)
    return "".join(out)


def test_interpreter_basics():  # the reference must itself be right for the comparison to mean anything
    src = '{{ range $i, $m := .Messages }}{{ if eq $i 0 }}[{{ .Role }}]{{ else if eq .Role "x" }}X{{ else }}-{{ end }}' \
          '{{ end }}{{- " a" }} {{ if and $.System (not (eq (len (slice $.Messages 1)) 5)) }}S{{ end }}'
    msgs = [{"role": "system", "content": "s"}, {"role": "x", "content": ""}, {"role": "y", "content": ""}]
    assert render_go(src, msgs) == "[system]X- a S"


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Arr."}, {"role": "user", "content": "Where is the treasure?"}],
]
EOS = "</s>"


def test_every_registry_template_has_a_go_twin():
    assert {t.name for t in TEMPLATES.values()} <= set(GO_TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_go_template_renders_like_jinja(name):
    jinja = TEMPLATES[name]
    text = make_modelfile("./model.gguf", name, eos_token=EOS)
    go_src = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    for conv in CONVERSATIONS:
        want = jinja.render(conv, add_generation_prompt=True, bos_token="", eos_token=EOS)
        assert render_go(go_src, conv) == want, (name, conv)
    stops = re.findall(r'PARAMETER stop "(.*)"', text)
    end = jinja.stop_text(EOS)
    assert end in stops and EOS in stops
    # the stop markers really occur at the end of an assistant turn in this format
    rendered = jinja.render(CONVERSATIONS[2], bos_token="", eos_token=EOS)
    assert "Hi! How can I help?" + end in rendered


def test_modelfile_layout_and_errors():
    text = make_modelfile("./m.gguf", "chatml", eos_token="<|endoftext|>", system="Answer in French.",
                          parameters={"temperature": 0.2})
    assert text.startswith("FROM ./m.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0.2" in text
    assert text.rstrip().endswith('SYSTEM """Answer in French."""')
    assert "SYSTEM" not in make_modelfile("./m.gguf", "chatml")
    with pytest.raises(ModelfileError, match="--chat-template"):
        make_modelfile("./m.gguf", None, jinja_source="{{ messages }}")
    with pytest.raises(ModelfileError, match='"""'):
        make_modelfile("./m.gguf", "chatml", system='a """ b')
    assert registry_name_for(TEMPLATES["llama-3"].source) == "llama-3"
    assert registry_name_for(TEMPLATES["gemma"].source) == "gemma"


# ---- the one template an export writes (issue 13 item 4) ----------------------------------------------------------

class _Tok:
    def __init__(self, chat_template=None):
        self.chat_template = chat_template


def test_export_uses_the_template_the_run_trained_with(tmp_path):
    import json

    from fasttune.export.modelfile import export_chat_template

    chatml = TEMPLATES["chatml"].source
    run = {"kind": "run", "chat_template": "llama-3"}
    # the run's record wins over the tokenizer's own template (the reported bug: ChatML written for a llama-3 run)
    t = export_chat_template(None, run, _Tok(chatml))
    assert (t.source, t.registry_name) == (TEMPLATES["llama-3"].source, "llama-3") and "record" in t.origin
    # a checkpoint folder records it the same way; an alias resolves to the registry name
    t = export_chat_template(None, {"kind": "checkpoint", "chat_template": "llama3"}, _Tok(chatml))
    assert t.registry_name == "llama-3"
    # the user's --chat-template overrides the record
    t = export_chat_template("phi-3", run, _Tok(chatml))
    assert (t.source, t.registry_name, t.origin) == (TEMPLATES["phi-3"].source, "phi-3", "--chat-template")
    # null in the record: training used the tokenizer's template, or ChatML when it had none
    assert export_chat_template(None, {"kind": "run", "chat_template": None}, _Tok(chatml)).registry_name == "chatml"
    t = export_chat_template(None, {"kind": "run", "chat_template": None}, _Tok(None))
    assert (t.source, t.registry_name) == (chatml, "chatml")
    # a run trained with a Jinja string: that source, recognised for Ollama by its markers
    custom = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    t = export_chat_template(None, {"kind": "run", "chat_template": custom}, _Tok(None))
    assert (t.source, t.registry_name) == (custom, "chatml")
    # a PEFT adapter records no training format, and no adapter at all: the tokenizer's own
    assert export_chat_template(None, {"kind": "peft", "chat_template": None}, _Tok(chatml)).source == chatml
    assert export_chat_template(None, None, _Tok(None)).source is None
    # the record read from a run's adapter folder
    (tmp_path / "fasttune_adapter.json").write_text(json.dumps({"chat_template": "gemma"}))
    assert export_chat_template(None, tmp_path, _Tok(chatml)).registry_name == "gemma"
    (tmp_path / "fasttune_adapter.json").write_text("{not json")
    with pytest.raises(ModelfileError, match="--chat-template"):
        export_chat_template(None, tmp_path, _Tok(chatml))
    with pytest.raises(ModelfileError, match="unknown chat template"):
        export_chat_template(None, {"kind": "run", "chat_template": "no-such"}, _Tok(chatml))


def test_gguf_modelfile_and_tokenizer_files_agree(tmp_path):
    """The GGUF's tokenizer.chat_template, the Modelfile's TEMPLATE and chat_template.jinja come from one choice."""
    gguf = pytest.importorskip("gguf")
    import shutil
    from pathlib import Path

    import fasttune
    from fasttune.export.gguf_writer import export_gguf
    from fasttune.export.modelfile import export_chat_template
    from fasttune.models import load_model
    from fasttune.models.checkpoint import load_tokenizer, save_tokenizer

    tiny = Path(fasttune.__file__).parent / "assets" / "tiny"
    d = tmp_path / "base"
    shutil.copytree(tiny, d)
    tok = load_tokenizer(d)
    tok.chat_template = TEMPLATES["chatml"].source  # the base tokenizer ships ChatML; the run trained llama-3
    chat = export_chat_template(None, {"kind": "run", "chat_template": "llama-3"}, tok)
    tok.chat_template = chat.source  # what the export CLI does before writing anything
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer=tok, quant="f32", chat_template=chat.source,
                perplexity=False)
    field = gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.chat_template"].contents()
    save_tokenizer(tok, tmp_path / "tok")
    jinja = (tmp_path / "tok" / "chat_template.jinja")
    saved = jinja.read_text() if jinja.exists() else load_tokenizer(tmp_path / "tok").chat_template
    modelfile = make_modelfile("./m.gguf", chat.registry_name, eos_token=tok.eos_token, jinja_source=chat.source)
    assert field == saved == TEMPLATES["llama-3"].source
    assert GO_TEMPLATES["llama-3"] in modelfile
