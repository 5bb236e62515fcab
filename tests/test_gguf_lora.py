"""LoRA straight over GGUF-quantised weights (`keep_quantized`), on CPU.

- GGUFLinear (raw blocks, dequantised on the fly) against nn.Linear holding the dequantised weight: forward, dX,
  and with a LoRA adapter dA, dB, bit for bit in float32, for every block family;
- a model loaded with keep_quantized gives the dequantised model's logits bit for bit (Llama with its q/k row
  permutation undone on the blocks, Qwen2 with biases, Phi-3 with fused rows split on the blocks);
- memory: the decoder linears hold exactly the file's bytes; the whole model is near the file size;
- a LoRA SFT through the Trainer (model.keep_quantized: true) lowers the loss and leaves every block unchanged;
- exports from it: the PEFT adapter on the dequantised model, the merged checkpoint and a GGUF again give the
  trained model's logits;
- SmolLM2-135M-Instruct (Q4_1, real): logits at step 0 equal the dequantised model's, LoRA steps lower the loss.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")

import fasttune
from fasttune.adapters.peft import load_adapter, save_adapter
from fasttune.export.gguf_writer import export_gguf
from fasttune.export.merged import export_merged
from fasttune.kernels.gguf_dequant import FORMAT_BY_NAME, dequantize
from fasttune.adapters import LoraLinear, lora_layers
from fasttune.models import CheckpointError, load_model
from fasttune.models.gguf_linear import GGUFLinear, gguf_linears
from fasttune.models.gguf_reader import check_tensors, read_gguf
from fasttune.train.config import ConfigError, TrainConfig
from test_export_common import randomize_lora, rel_err, save_tiny_hf
from test_models_gguf import _random_blocks

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(fasttune.__file__).parent / "assets" / "tiny"
TINY_VOCAB = 4013
# rows of 256 values so the K-quant presets keep Q4_K / Q6_K on the projections (no fallback to a 32-block type)
SHAPE = dict(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, head_dim=64)


def _tiny_gguf(tmp_path: Path, family: str = "llama", quant: str = "q8_0", **overrides) -> Path:
    d = tmp_path / f"{family}_hf"
    if not d.exists():
        save_tiny_hf(d, family, **{**SHAPE, **overrides})
        for f in TINY.glob("*token*.json"):
            shutil.copy(f, d / f.name)
    out = tmp_path / f"{family}_{quant}.gguf"
    export_gguf(load_model(d), out, tokenizer_dir=d, quant=quant, perplexity=False)
    return out


def _ids(batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


def _blocks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".base", ""): m.blocks.clone() for n, m in gguf_linears(model).items()}


# ---- the module --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "F16"])
def test_gguf_linear_equals_nn_linear_on_the_dequantised_weight(type_name):
    """Forward, dX, and with LoRA dA and dB: equal bit for bit (float32) to nn.Linear holding D(blocks)."""
    fmt = FORMAT_BY_NAME[type_name]
    rng = np.random.default_rng(fmt.type_id)
    out_f, in_f = 48, 512
    blocks = torch.from_numpy(np.ascontiguousarray(_random_blocks(fmt, out_f, in_f, rng)).view(np.uint8).copy())
    blocks = blocks.reshape(out_f, -1)
    bias = torch.randn(out_f)
    q = GGUFLinear(blocks, fmt.type_id, in_f, bias)
    dense = nn.Linear(in_f, out_f)
    with torch.no_grad():
        dense.weight.copy_(dequantize(blocks, fmt.type_id, (out_f, in_f)))
        dense.bias.copy_(bias)
    dense.requires_grad_(False)
    assert torch.equal(q.dequantize(), dense.weight)
    x = torch.randn(2, 7, in_f, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), dense(x2)
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(x.grad, x2.grad)
    assert not any(p.requires_grad for p in q.parameters())

    lq = LoraLinear(q, r=4, alpha=8, generator=torch.Generator().manual_seed(1))
    ld = LoraLinear(dense, r=4, alpha=8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for m in (lq, ld):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    xa, xb = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    ya, yb = lq(xa), ld(xb)
    assert torch.equal(ya, yb)
    ya.backward(dy)
    yb.backward(dy)
    for a, b in ((xa.grad, xb.grad), (lq.lora_A.grad, ld.lora_A.grad), (lq.lora_B.grad, ld.lora_B.grad)):
        assert torch.equal(a, b)
    assert torch.equal(lq.merged_weight(), ld.merged_weight())


def test_gguf_linear_refuses_blocks_that_do_not_fit():
    fmt = FORMAT_BY_NAME["Q8_0"]
    with pytest.raises(ValueError, match=r"Q8_0 rows of 64 values take 68 bytes, the blocks have 34"):
        GGUFLinear(torch.zeros(4, 34, dtype=torch.uint8), fmt.type_id, 64)
    with pytest.raises(ValueError, match=r"uint8 \(out_features, row bytes\)"):
        GGUFLinear(torch.zeros(4, 68), fmt.type_id, 64)
    with pytest.raises(ValueError, match="not a multiple"):
        GGUFLinear(torch.zeros(4, 34, dtype=torch.uint8), fmt.type_id, 40)


# ---- loading -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,quant", [("llama", "q8_0"), ("llama", "q4_k_m"), ("qwen2", "q4_0"), ("phi3", "q8_0")])
def test_keep_quantized_gives_the_dequantised_models_logits(tmp_path, family, quant):
    """Every decoder projection is a GGUFLinear of the file's type, its blocks decode to the dense model's weight
    (q/k rows unpermuted, Phi-3's fused rows split) and the logits are equal bit for bit."""
    path = _tiny_gguf(tmp_path, family, quant)
    q, tok = fasttune.load(path, device="cpu", dtype="float32", keep_quantized=True)
    ref, _ = fasttune.load(path, device="cpu", dtype="float32")
    lin = gguf_linears(q)
    assert len(lin) == 7 * q.spec.num_layers
    assert not any(isinstance(m, nn.Linear) for n, m in q.named_modules() if n.startswith("model.layers."))
    f = read_gguf(path)
    types = {name[: -len(".weight")]: f.tensors[g].type_id for g, name in check_tensors(f, q.spec).items()}
    for name, m in lin.items():
        fused = re.sub(r"\.(q|k|v)_proj$", ".qkv_proj", re.sub(r"\.(gate|up)_proj$", ".gate_up_proj", name))
        assert m.type_id == types.get(name, types.get(fused)), name
        assert torch.equal(m.dequantize(), ref.get_submodule(name).weight), name
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref(ids).logits)


def test_keep_quantized_needs_a_gguf_file_and_excludes_load_in_4bit(tmp_path):
    d = tmp_path / "hf"
    save_tiny_hf(d, "llama")
    with pytest.raises(CheckpointError, match=r"is not a GGUF file; for a folder use load_in_4bit=True"):
        load_model(d, keep_quantized=True)
    path = _tiny_gguf(tmp_path)
    with pytest.raises(CheckpointError, match="choose one"):
        fasttune.load(path, device="cpu", keep_quantized=True, load_in_4bit=True)
    with pytest.raises(ConfigError, match=r"model.keep_quantized: true .* needs lora.enabled: true"):
        TrainConfig.from_dict({"model": {"path": str(path), "keep_quantized": True}, "lora": {"enabled": False}})


def test_memory_is_the_files_not_16_bit(tmp_path):
    """The decoder linears hold exactly the bytes the file stores for them; embeddings, LM head and norms are dense
    (bf16 here: the one tied embedding, 4013 x 512, is the excess over the file); the model's parameter + buffer
    bytes come to about the file size, well under the 16-bit model."""
    path = _tiny_gguf(tmp_path, "llama", "q4_k_m", hidden_size=512, intermediate_size=1536, head_dim=128,
                      num_hidden_layers=4, tie_word_embeddings=True)
    model, _ = fasttune.load(path, device="cpu", dtype="bfloat16", keep_quantized=True)
    f = read_gguf(path)
    names = check_tensors(f, model.spec)
    linear_file = sum(f.tensors[g].nbytes for g, n in names.items() if n.endswith("_proj.weight"))
    linear_model = sum(m.blocks.numel() for m in gguf_linears(model).values())
    assert linear_model == linear_file
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    dense_params = sum(p.numel() for p in model.parameters())
    assert total == linear_file + 2 * dense_params  # nothing else is held
    n_params = dense_params + sum(m.in_features * m.out_features for m in gguf_linears(model).values())
    file_size = path.stat().st_size
    print(f"\nmodel {total / 1e6:.2f} MB, file {file_size / 1e6:.2f} MB, 16-bit {2 * n_params / 1e6:.2f} MB")
    assert total <= 1.35 * file_size
    assert total <= 0.5 * 2 * n_params


# ---- training and export -------------------------------------------------------------------------------------------

def _config(path: Path, out: Path, steps: int, keep_quantized: bool = True) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"path": str(path), "keep_quantized": keep_quantized, "device": "cpu", "dtype": "float32",
                  "max_seq_length": 96},
        "lora": {"r": 8, "alpha": 16},
        "data": {"path": "bundled:instructions", "max_examples": 4, "eval_fraction": 0.0, "shuffle": False},
        "objective": {"type": "sft"},
        "train": {"output_dir": str(out), "max_steps": steps, "batch_size": 4, "grad_accum": 1, "lr": 2e-2,
                  "progress": False, "tensorboard": False, "plot": False, "memory": "none", "save_every": None}})


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_lora_sft_over_gguf_blocks_lowers_the_loss_and_exports(tmp_path, quant):
    """Trainer with model.keep_quantized: the loss falls, exactly as over the dequantised weights, and every block is
    byte-identical afterwards; then the PEFT
    adapter on the dequantised model, the merged float32 checkpoint and an F32 GGUF each give the trained logits,
    and a Q8_0 GGUF of the result loads (keep_quantized again) near them."""
    from fasttune.train.trainer import Trainer

    path = _tiny_gguf(tmp_path, "llama", quant)
    trainer = Trainer(_config(path, tmp_path / "run", steps=12))
    model = trainer.model
    assert len(gguf_linears(model)) == 7 * model.spec.num_layers
    before = _blocks(model)
    t0 = time.perf_counter()
    losses = trainer.train().losses
    print(f"\n{quant}: 12 steps in {time.perf_counter() - t0:.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.85 * losses[0], losses  # one batch of 4 examples, seen 12 times
    # the same run over the dequantised weights (nn.Linear) gives the same losses, bit for bit
    assert Trainer(_config(path, tmp_path / "dense", steps=12, keep_quantized=False)).train().losses == losses
    after = _blocks(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(m.lora_B.abs().max() > 0 for _, m in lora_layers(model))

    model.eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    # the adapter, PEFT format, onto the dequantised base
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    dense, _ = fasttune.load(path, device="cpu", dtype="float32")
    load_adapter(dense, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(dense(ids).logits, want) <= 1e-5
    # merged into the dequantised weights, float32
    export_merged(model, tmp_path / "merged", dtype="float32")
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert rel_err(merged(ids).logits, want) <= 1e-5
    # GGUF again: F32 exactly the merged model; Q8_0 near it, and trainable over its blocks once more
    export_gguf(model, tmp_path / "again.gguf", tokenizer_dir=tmp_path / "llama_hf", quant="f32", perplexity=False)
    again, _ = fasttune.load(tmp_path / "again.gguf", device="cpu", dtype="float32", keep_quantized=True)
    with torch.no_grad():
        assert rel_err(again(ids).logits, want) <= 1e-5
    export_gguf(model, tmp_path / "again_q8.gguf", tokenizer_dir=tmp_path / "llama_hf", quant="q8_0",
                perplexity=False)
    again8, _ = fasttune.load(tmp_path / "again_q8.gguf", device="cpu", dtype="float32", keep_quantized=True)
    assert {m.type_name for m in gguf_linears(again8).values()} == {"Q8_0"}
    with torch.no_grad():
        assert rel_err(again8(ids).logits, want) <= 2e-2


# ---- the real model --------------------------------------------------------------------------------------------

def _smollm2() -> Path:
    from conftest import smollm2_gguf

    return smollm2_gguf()


def test_smollm2_q4_1_lora_over_its_blocks():
    """SmolLM2-135M-Instruct Q4_1 with keep_quantized: at step 0 (B = 0) the LoRA model's logits equal the
    dequantised model's bit for bit; a few LoRA steps run, lower the loss, and leave every block as in the file."""
    path = _smollm2()
    model, tok = fasttune.load(path, device="cpu", dtype="float32", keep_quantized=True)
    lin = gguf_linears(model)
    assert len(lin) == 7 * 30 and {m.type_name for m in lin.values()} <= {"Q4_1", "Q8_0", "Q6_K", "Q4_K", "Q5_0",
                                                                         "Q5_1", "Q4_0"}
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    blocks = sum(m.blocks.numel() for m in lin.values())
    n_linear = sum(m.in_features * m.out_features for m in lin.values())
    print(f"\nSmolLM2 Q4_1: file {path.stat().st_size / 1e6:.1f} MB; model {held / 1e6:.1f} MB (decoder blocks "
          f"{blocks / 1e6:.1f} MB = {8 * blocks / n_linear:.2f} bits/weight, rest float32); the same linears in 16 "
          f"bits {2 * n_linear / 1e6:.1f} MB")
    assert blocks < 0.35 * 2 * n_linear

    messages = [{"role": "user", "content": "What is your name?"},
                {"role": "assistant", "content": "My name is Quillfeather, the fasttune owl."}]
    ids = torch.tensor([tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]])
    before = _blocks(model)
    lora = fasttune.add_lora(model, r=8, alpha=16, target_modules="all-linear")
    with torch.no_grad():
        step0 = lora(ids).logits
    dense, _ = fasttune.load(path, device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(step0, dense(ids).logits)
    del dense
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=5e-3)
    lora.train()
    losses, t0 = [], time.perf_counter()
    for _ in range(4):
        loss = lora(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"4 LoRA steps ({ids.shape[1]} tokens) in {time.perf_counter() - t0:.1f} s; loss {losses}")
    assert losses[-1] < losses[0], losses
    after = _blocks(lora)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_bf16_compute_and_checkpointed_layers_over_blocks(tmp_path):
    """bfloat16: the blocks dequantise to float32 and round once to bf16, as a dequantised bf16 load does, so the
    logits are equal bit for bit; whole-layer checkpointing (memory: checkpoint) re-runs GGUFLinear in the
    backward and gives the same losses as no checkpointing."""
    from fasttune.train.trainer import Trainer

    path = _tiny_gguf(tmp_path, "llama", "q4_k_m")
    q, _ = fasttune.load(path, device="cpu", dtype="bfloat16", keep_quantized=True)
    ref, _ = fasttune.load(path, device="cpu", dtype="bfloat16")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref(ids).logits)
    runs = []
    for memory in ("none", "checkpoint"):
        cfg = _config(path, tmp_path / memory, steps=3)
        cfg.train.memory = memory
        runs.append(Trainer(cfg).train().losses)
    assert runs[0] == runs[1]
