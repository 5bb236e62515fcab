"""Conversations, chat templates and label masking, on the bundled tiny tokenizer."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from fasttune.data import (CHAT_TEMPLATES, DataError, generation_prompt_ids, get_chat_template, standardize_conversation,
                           tiny_tokenizer_path, tokenize_conversation, tokenize_text)
from fasttune.data.chat_templates import ChatTemplate
from fasttune.data.tokenize import assistant_spans

ALL_TEMPLATES = list(CHAT_TEMPLATES) + ["tokenizer"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris ✓"}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path())


def test_bundled_tokenizer_loads_both_ways(tok):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    assert isinstance(tok, PreTrainedTokenizerFast)
    raw = Tokenizer.from_file(tiny_tokenizer_path() + "/tokenizer.json")
    assert [tok.bos_token, tok.eos_token, tok.pad_token] == ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    assert [raw.token_to_id(t) for t in ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]] == [0, 1, 2, 3, 4]
    assert 3900 <= len(tok) <= 4096
    ids = tok("héllo wörld ✓").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # BOS from the post-processor
    assert tok.decode(ids, skip_special_tokens=True) == "héllo wörld ✓"
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok(text).input_ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("name", ALL_TEMPLATES)
def test_template_renders_bos_once_stop_after_every_assistant_turn_and_masks_exactly(tok, name):
    template = get_chat_template(name, tok)
    ex = tokenize_conversation(CHAT, tok, template)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    text = template.render(CHAT, bos_token=tok.bos_token, eos_token=tok.eos_token)
    stop = template.stop_text(tok.eos_token) or "<|im_end|>"  # the tokenizer's own template is ChatML
    for m in CHAT:
        if m["role"] == "assistant":
            assert m["content"] + stop in text, f"{name}: no end-of-turn after {m['content']!r}"
    # unmasked labels are exactly the assistant contents, each followed by its end-of-turn marker
    targets = tok.decode([t for t in labels if t != -100])
    expected = [m["content"] + stop for m in CHAT if m["role"] == "assistant"]
    assert targets.replace(" ", "") == "".join(expected).replace(" ", ""), (name, targets)
    unmasked = [i for i, t in enumerate(labels) if t != -100]
    assert all(labels[i] == ids[i] for i in unmasked) and labels[0] == -100
    # the generation prompt is exactly the training tokens before each assistant answer: inference sees what
    # training saw, and the first trained token of each answer comes right after it
    gen = generation_prompt_ids(CHAT[:2], tok, template)
    assert gen.count(tok.bos_token_id) == 1
    assert ids[:len(gen)] == gen and labels[len(gen) - 1] == -100 and labels[len(gen)] != -100
    gen2 = generation_prompt_ids(CHAT[:4], tok, template)
    assert ids[:len(gen2)] == gen2 and labels[len(gen2)] != -100 and len(gen2) > len(gen)


@pytest.mark.parametrize("name", ALL_TEMPLATES)
def test_train_on_all_labels_every_token_but_the_first(tok, name):
    ex = tokenize_conversation(CHAT, tok, get_chat_template(name, tok), train_on="all")
    assert ex["labels"][0] == -100 and ex["labels"][1:] == ex["input_ids"][1:]


def test_bos_never_doubled_when_template_and_tokenizer_both_add_it(tok):
    template = ChatTemplate("double", "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}", None)
    ex = tokenize_conversation(CHAT[1:3], tok, template)
    assert ex["input_ids"].count(tok.bos_token_id) == 1


def test_plain_text_trains_on_all_tokens(tok):
    ex = tokenize_text("Water boils at 100 degrees.", tok)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"][0] == -100 and ex["labels"][1:] == ex["input_ids"][1:]


def test_sharegpt_and_openai_standardise_to_the_same_messages():
    sharegpt = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    openai = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "q"}]},
              {"role": "assistant", "content": "a"}]
    want = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert standardize_conversation(sharegpt) == want == standardize_conversation(openai)


@pytest.mark.parametrize("conv, fragment", [
    ([{"from": "human", "value": "hi"}], "conversation has no assistant turn, so there is nothing to learn from. Available: 'user'"),
    ([{"speaker": "human", "text": "hi"}], "turn 0 has neither role/content (OpenAI) nor from/value (ShareGPT) keys. Available: 'speaker', 'text'"),
    ([{"role": "wizard", "content": "hi"}], "turn 0 has unknown role 'wizard'. Available:"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}], "turn 0 content is a non-string value of type int"),
    ([], "conversation has no turns"),
    ("hello", "expected a list of turns, got str"),
])
def test_bad_conversations(conv, fragment):
    from fasttune.data import Location
    with pytest.raises(DataError) as e:
        standardize_conversation(conv, Location("chats.jsonl", line=9), "messages")
    assert str(e.value).startswith("chats.jsonl, line 9, column 'messages': ") and fragment in str(e.value)


def test_unknown_template_name_lists_available(tok):
    with pytest.raises(DataError, match=r"unknown chat template 'llama-9'. Available: 'llama-3', 'chatml'"):
        get_chat_template("llama-9", tok)


def test_template_sandbox_blocks_python_internals(tok):
    evil = ChatTemplate("evil", "{{ messages.__class__.__mro__[1].__subclasses__() }}", None)
    with pytest.raises(Exception):
        evil.render(CHAT)


def test_template_raise_exception_becomes_data_error(tok):
    with pytest.raises(DataError, match="supports system"):
        tokenize_conversation([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                               {"role": "assistant", "content": "c"}], tok, get_chat_template("gemma"))


# ---- property: every unmasked label is a token of an assistant turn ------------------------------------------
content = st.text(alphabet=st.sampled_from("ab xyz019.,!?\n✓é<|>_"), min_size=0, max_size=12)


@st.composite
def conversations(draw):
    turns = []
    if draw(st.booleans()):
        turns.append({"role": "system", "content": draw(content)})
    for _ in range(draw(st.integers(1, 3))):
        turns.append({"role": "user", "content": draw(content)})
        turns.append({"role": "assistant", "content": draw(content)})
    return turns


@settings(max_examples=50, deadline=None)
@given(conv=conversations(), name=st.sampled_from(ALL_TEMPLATES))
def test_property_every_unmasked_label_is_a_token_of_an_assistant_turn(tok, conv, name):
    template = get_chat_template(name, tok)
    ex = tokenize_conversation(conv, tok, template)
    full, spans = assistant_spans(conv, template, tok.bos_token, tok.eos_token)
    shift = len(tok.bos_token) if full.startswith(tok.bos_token) else 0
    enc = tok(full[shift:], add_special_tokens=False, return_offsets_mapping=True)
    assert ex["input_ids"][1:] == enc["input_ids"]  # training tokens == the template's text tokenised once
    for t, label in enumerate(ex["labels"][1:]):
        if label == -100:
            continue
        start, end = (o + shift for o in enc["offset_mapping"][t])
        assert any(s <= start and end <= e for s, e in spans), (name, t, full[start:end])
        assert label == enc["input_ids"][t]
    # and each span holds exactly one assistant message followed by the template's stop marker
    stop = template.stop_text(tok.eos_token) or "<|im_end|>"
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert len(spans) == len(answers)
    lead = " " if template.name in ("mistral", "vicuna") else ""
    for (s, e), answer in zip(spans, answers):
        assert full[s:e] == lead + answer + stop, (name, full[s:e], answer)


def test_tokenizer_without_bos_or_chat_template():
    """Qwen-style tokenizers have no BOS: none is added; a base tokenizer without chat_template falls back to ChatML."""
    from fasttune.data import build_dataset, bundled_data_path
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path(), bos_token=None)
    assert tok.bos_token_id is None
    ex = tokenize_conversation(CHAT, tok, get_chat_template("llama-3"))
    assert 0 not in ex["input_ids"] and ex["labels"][0] == -100
    assert tokenize_text("abc", tok)["input_ids"][-1] == tok.eos_token_id
    tok.chat_template = None
    splits = build_dataset(bundled_data_path("conversations.jsonl"), tok, max_rows=5)
    assert splits.chat_template.name == "chatml" and len(splits.train) == 5
    with pytest.raises(DataError, match="the tokenizer has no chat_template"):
        get_chat_template("tokenizer", tok)
