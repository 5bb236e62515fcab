"""The {column} / [[...]] prompt-template language: examples, errors, and hypothesis properties."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttune.data import DataError, Location, PromptTemplate, TemplateError


def test_optional_section_kept_and_dropped():
    t = PromptTemplate("{instruction}[[\nInput: {input}]]")
    assert t.format({"instruction": "Add.", "input": "1, 2"}) == "Add.\nInput: 1, 2"
    assert t.format({"instruction": "Add.", "input": ""}) == "Add."
    assert t.format({"instruction": "Add.", "input": None}) == "Add."
    assert t.format({"instruction": "Add."}) == "Add."
    assert t.format({"instruction": "Add.", "input": float("nan")}) == "Add."
    assert t.required_columns == ["instruction"] and t.optional_columns == ["input"]


def test_titanic_row_merged_into_one_sentence():
    row = {"PassengerId": 1, "Survived": 0, "Pclass": 3, "Name": "Braund, Mr. Owen Harris", "Sex": "male",
           "Age": 22.0, "SibSp": 1, "Parch": 0, "Ticket": "A/5 21171", "Fare": 7.25, "Cabin": None, "Embarked": "S"}
    t = PromptTemplate("Passenger {Name} ({Sex}[[, aged {Age}]]) travelled in class {Pclass} on ticket {Ticket}, "
                       "paid {Fare}[[, cabin {Cabin}]], embarked at {Embarked}, with {SibSp} siblings/spouses and "
                       "{Parch} parents/children aboard.")
    assert t.format(row) == ("Passenger Braund, Mr. Owen Harris (male, aged 22) travelled in class 3 on ticket "
                             "A/5 21171, paid 7.25, embarked at S, with 1 siblings/spouses and 0 parents/children aboard.")


def test_nested_sections_and_escapes():
    t = PromptTemplate("{{literal}} {a}[[ x={x}[[ y={y}]]]] [single] }}")
    assert t.format({"a": "A", "x": "1", "y": "2"}) == "{literal} A x=1 y=2 [single] }"
    assert t.format({"a": "A", "x": "1"}) == "{literal} A x=1 [single] }"
    assert t.format({"a": "A", "y": "2"}) == "{literal} A [single] }"  # outer dropped: x missing


@pytest.mark.parametrize("source, fragment", [
    ("{a", "unclosed '{'"), ("a}", "unmatched '}'"), ("{}", "empty column name"), ("[[ {a}", "never closed"),
    ("{a}]]", "closes no '[['"), ("{a\n}", "unclosed '{'"), ("{a{b}", "unclosed '{'"),
])
def test_malformed_templates_raise_clear_errors(source, fragment):
    with pytest.raises(TemplateError, match="character") as e:
        PromptTemplate(source)
    assert fragment in str(e.value) and repr(source) in str(e.value)


def test_missing_required_column_names_column_location_and_available():
    with pytest.raises(TemplateError) as e:
        PromptTemplate("{question} {context}").format({"question": "q", "ctx": "c"}, Location("d.csv", line=7))
    msg = str(e.value)
    assert "d.csv, line 7" in msg and "column 'context'" in msg and "'question', 'ctx'" in msg
    assert e.value.column == "context" and e.value.line == 7 and isinstance(e.value, DataError)


def test_non_string_value_is_an_error():
    with pytest.raises(TemplateError, match="non-string value of type list"):
        PromptTemplate("{a}").format({"a": [1, 2]}, Location("x.jsonl", line=3))
    with pytest.raises(TemplateError, match="non-string value of type dict"):
        PromptTemplate("[[{a}]]").format({"a": {"k": 1}})


# ---- property-based: a reference renderer over a generated syntax tree -------------------------------------
NAMES = ["a", "b", "col 1", "x_y"]
plain_text = st.text(alphabet=st.sampled_from("ab \n:.,é✓"), max_size=6)


def nodes(depth):
    leaf = st.one_of(plain_text.map(lambda s: ("text", s)), st.sampled_from(NAMES).map(lambda n: ("field", n)),
                     st.just(("text", "{")), st.just(("text", "}")))
    if depth == 0:
        return st.lists(leaf, max_size=4)
    return st.lists(st.one_of(leaf, nodes(depth - 1).map(lambda parts: ("optional", parts))), max_size=4)


def to_source(parts):
    out = []
    for kind, v in parts:
        if kind == "text":
            out.append(v.replace("{", "{{").replace("}", "}}") if v in "{}" else v)
        elif kind == "field":
            out.append("{" + v + "}")
        else:
            out.append("[[" + to_source(v) + "]]")
    return "".join(out)


def reference(parts, row, optional):
    out = []
    for kind, v in parts:
        if kind == "text":
            out.append(v)
        elif kind == "field":
            val = row.get(v)
            text = None if val is None or (isinstance(val, float) and math.isnan(val)) else (
                str(int(val)) if isinstance(val, float) and val.is_integer() else str(val))
            if text is None or (optional and text == ""):
                return None
            out.append(text)
        else:
            inner = reference(v, row, True)
            if inner is not None:
                out.append(inner)
    return "".join(out)


def required_fields(parts):
    return {v for kind, v in parts if kind == "field"}


values = st.one_of(st.none(), st.text(max_size=5), st.integers(-5, 5), st.sampled_from([1.5, 2.0, float("nan")]))


@settings(max_examples=50, deadline=None)
@given(parts=nodes(2), row=st.dictionaries(st.sampled_from(NAMES), values))
def test_property_valid_templates_never_raise(parts, row):
    template = PromptTemplate(to_source(parts))  # must not raise
    for name in required_fields(parts):
        row.setdefault(name, "v")
        if row[name] is None or (isinstance(row[name], float) and math.isnan(row[name])):
            row[name] = "v"
    assert template.format(row) == reference(parts, row, False)


@settings(max_examples=50, deadline=None)
@given(parts=nodes(1), breaker=st.sampled_from(["{", "]]", "{}", "[[", "}"]))
def test_property_invalid_templates_always_raise(parts, breaker):
    source = to_source(parts)
    bad = breaker + source if breaker in ("]]", "}", "{}") else source + breaker
    with pytest.raises(TemplateError) as e:
        PromptTemplate(bad)
    assert "prompt template" in str(e.value) and "character" in str(e.value)


@settings(max_examples=50, deadline=None)
@given(parts=nodes(1).filter(lambda p: any(k == "field" for k, _ in p)))
def test_property_missing_required_column_always_raises(parts):
    source = to_source(parts)
    template = PromptTemplate(source)
    if not template.required_columns:
        return
    with pytest.raises(TemplateError, match="required column"):
        template.format({})
