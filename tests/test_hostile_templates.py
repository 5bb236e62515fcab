"""Chat templates are untrusted code: rendering is bounded in time, size and loop iterations, and a template that
goes over a bound is reported as a one-line error naming the template, in training data preparation and in the
doctor. The bombs run in a subprocess under an address-space limit, so a regression fails instead of eating
the machine."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fasttune.data import DataError, build_dataset, tiny_tokenizer_path
from fasttune.data.chat_templates import ChatTemplate, ChatTemplateLimitError

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

BOMBS = {
    "double range loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string doubled 40 times (+)": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
                                   "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "string doubled 40 times (~)": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
                                   "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "string repeated": "{{ 'x' * 10000000000 }}",
    "center filter": "{{ 'x'|center(1000000000) }}",
    "center method": "{{ 'x'.center(1000000000) }}",
    "printf width": "{{ '%01000000000d' % 1 }}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "huge integer": "{{ 2 ** 1000000000 }}",
    "joined list": "{{ (['x' * 1000000] * 1000)|join }}",
    "captured block": "{% set x %}{% for i in range(100000) %}{% for j in range(100) %}{{ 'y' * 1000 }}"
                      "{% endfor %}{% endfor %}{% endset %}{{ x|length }}",
    "endless recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
}

_RUNNER = textwrap.dedent("""
    import json, resource, sys, time
    from fasttune.data.chat_templates import ChatTemplate
    from fasttune.data import DataError
    # 1.5 GiB above what the imports use: a bomb that got through fails here instead of taking the machine
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 1536 * 2**20, vm + 1536 * 2**20))
    results = {}
    for name, source in json.loads(sys.argv[1]).items():
        start = time.monotonic()
        try:
            ChatTemplate(name, source, None).render([{"role": "user", "content": "hi"}])
            result = {"error": None}
        except DataError as e:
            result = {"error": str(e), "type": type(e).__name__}
        except BaseException as e:
            result = {"error": repr(e)[:300], "type": "RAW " + type(e).__name__}
        result["seconds"] = time.monotonic() - start
        results[name] = result
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def bomb_results() -> dict:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(BOMBS)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(BOMBS))
def test_template_bomb_fails_fast_with_a_one_line_error_naming_the_template(bomb_results, name):
    result = bomb_results[name]
    assert result["type"] == "ChatTemplateLimitError", result
    assert result["error"].startswith(f"chat template {name!r} ") and "\n" not in result["error"], result
    assert result["seconds"] < 5, result


def test_normal_templates_are_not_limited():
    """Long legitimate data (a 1M-character turn, 2,000 turns through a loop using loop.* and filters) renders."""
    long_chat = [{"role": "user", "content": "x" * 1_000_000}, {"role": "assistant", "content": "ok"}]
    source = ("{% for m in messages %}{{ loop.index }} {{ m['role']|upper }}: {{ m['content']|trim }}"
              "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}")
    assert len(ChatTemplate("t", source, None).render(long_chat)) > 1_000_000
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(2000)]
    assert ChatTemplate("t", source, None).render(many).count("\n") == 1999
    assert ChatTemplate("t", "{{ messages|tojson(indent=2) }}", None).render(CHAT).startswith("[\n  {")


def test_a_runaway_tokenizer_template_stops_training_data_preparation_naming_the_template():
    """Not skipped row by row even with on_error='skip': the template is the problem, not the data."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    tok.chat_template = BOMBS["double range loop"]
    rows = [{"messages": CHAT}] * 3
    with pytest.raises(ChatTemplateLimitError, match=r"chat template 'tokenizer' runs too many loop iterations"):
        build_dataset(rows, tok, chat_template="tokenizer", on_error="skip", max_seq_length=64)


def test_template_errors_of_any_python_kind_are_one_line_data_errors():
    for source in ("{{ 1 + 'a' }}", "{{ range(10**9)|list }}", "{{ messages[5] + 1 }}", "{{ 1 // 0 }}"):
        with pytest.raises(DataError, match=r"^chat template 't' failed to render: ") as e:
            ChatTemplate("t", source, None).render(CHAT)
        assert "\n" not in str(e.value)
