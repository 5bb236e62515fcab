"""LoRA on the output layer (`target_modules` with "lm_head"): the fused loss with the adapter folded in as r extra
features equals plain PyTorch on materialised logits; PEFT's initialisation, loss and gradients; PEFT export and
import; merged and GGUF export; the tied-embeddings refusal; a short training run. fp32 on CPU, tiny models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fasttune
from fasttune import kernels
from fasttune.adapters.peft import load_adapter, save_adapter
from fasttune.export.merged import export_merged, merged_state_dict
from fasttune.adapters import LoraLMHead, add_lora, disable_adapters, lora_layers, normalize_targets
from fasttune.adapters.attach import initial_lora_A
from fasttune.models import load_model
from test_export_common import FP32_TOL, randomize_lora, random_ids, rel_err, save_tiny_hf
from test_export_adapter import _peft_logits
from test_lora import _ours_lora, _peft_lora

TINY = Path(fasttune.__file__).parent / "assets" / "tiny"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# one thread: exact float comparisons need a fixed summation order (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save_tiny_hf(d, "llama")  # untied
    return d


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """Gemma 2 (final logit softcap 3.0), untied so the head can carry a LoRA."""
    d = tmp_path_factory.mktemp("gemma2")
    save_tiny_hf(d, "gemma2", tie_word_embeddings=False)
    return d


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :4] = -100  # some ignored targets
    return labels


def _reference_loss(model, ids, labels, label_smoothing=0.0, num_items_in_batch=None, dropout_seed=None):
    """Plain PyTorch: materialised logits h W^T + s (drop(h) A^T) B^T, softcap, F.cross_entropy (sum / n)."""
    h = model.model(ids)[0]
    head = model.lm_head
    hid = h[:, :-1].reshape(-1, h.shape[-1])
    x = hid
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
        x = F.dropout(hid, head.dropout_p, training=True)
    logits = (hid @ head.base.weight.T + head.scaling * (x @ head.lora_A.T) @ head.lora_B.T).float()
    cap = model.spec.final_softcap
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    n = num_items_in_batch if num_items_in_batch is not None else int((targets != -100).sum())
    return loss / n


def _grads(model, loss):
    params = [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]
    return torch.autograd.grad(loss, params)


def _triton_ce():
    import fasttune.kernels.cross_entropy as ce

    if ce.triton is None or (not torch.cuda.is_available()
                             and type(ce._ce_loss_and_grad_kernel).__name__ != "InterpretedFunction"):
        pytest.skip("Triton's interpreter is not active (TRITON_INTERPRET=1 must be set before triton is imported)")
    return ce


# ---- (1) the fused loss equals materialised logits -----------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("targets", [["lm_head"], ["q_proj", "v_proj", "down_proj", "lm_head"]])
def test_model_loss_and_grads_equal_materialised_logits(family, targets, llama_dir, gemma2_dir):
    model = add_lora(load_model(llama_dir if family == "llama" else gemma2_dir), r=4, alpha=8,
                     target_modules=targets)
    assert isinstance(model.lm_head, LoraLMHead)
    if family == "gemma2":
        assert model.spec.final_softcap == 3.0
    randomize_lora(model, scale=0.3)
    ids = random_ids()
    labels = _labels(ids)

    def no_logits(*a, **k):  # the training loss must not form the (tokens x vocab) logits through the head
        raise AssertionError("the loss path called the LM head's forward")

    for num_items in (None, 37):
        model.lm_head.forward = no_logits
        loss = model(ids, labels=labels, num_items_in_batch=num_items, return_logits=False).loss
        del model.lm_head.forward
        ref = _reference_loss(model, ids, labels, num_items_in_batch=num_items)
        assert rel_err(loss, ref) <= 1e-6
        for g, r in zip(_grads(model, loss), _grads(model, ref)):
            assert r.abs().max() > 0
            assert rel_err(g, r) <= 1e-5
    # the frozen base weight gets nothing
    assert not model.lm_head.base.weight.requires_grad and model.lm_head.base.weight.grad is None
    model(ids, labels=labels).loss.backward()
    assert model.lm_head.base.weight.grad is None and model.lm_head.lora_B.grad.abs().sum() > 0
    # the logits path (generation, return_logits) is the LoRA head's forward, with the softcap
    with torch.no_grad():
        h = model.model(ids)[0]
        head = model.lm_head
        z = (h @ head.base.weight.T + head.scaling * (h @ head.lora_A.T) @ head.lora_B.T).float()
        if model.spec.final_softcap:
            z = torch.tanh(z / model.spec.final_softcap) * model.spec.final_softcap
        assert rel_err(model(ids).logits, z) <= 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family,label_smoothing", [("llama", 0.1), ("gemma2", 0.0), ("gemma2", 0.1)])
def test_fused_ce_with_widened_head_label_smoothing_softcap(backend, family, label_smoothing, llama_dir, gemma2_dir,
                                                            monkeypatch):
    """The kernel itself (the Triton one too, several token chunks): B passed as extra weight columns gets its
    gradient, nothing reaches W (no gradient is even computed for it), and label smoothing / softcap /
    num_items_in_batch are those of the materialised loss."""
    if backend == "triton":
        ce = _triton_ce()
        monkeypatch.setattr(ce, "MAX_VOCAB_BLOCK", 32)
        monkeypatch.setattr(ce, "CHUNK_LOGITS_BYTES", 5 * 96 * 4)  # 5 rows per chunk
        fused = ce.fused_linear_cross_entropy
    else:
        fused = kernels.fused_linear_cross_entropy
    model = add_lora(load_model(llama_dir if family == "llama" else gemma2_dir), r=4, alpha=8,
                     target_modules=["v_proj", "lm_head"])
    randomize_lora(model, scale=0.3)
    ids = random_ids()
    labels = _labels(ids)
    h = model.model(ids)[0]
    hid, weight, extra = model.loss_head_inputs(h[:, :-1].reshape(-1, h.shape[-1]))
    assert hid.shape[-1] == model.spec.hidden_size + 4 and weight is model.lm_head.base.weight
    assert extra.shape == (model.spec.vocab_size, 4) and extra.requires_grad and not weight.requires_grad
    loss = fused(hid, weight, labels[:, 1:].reshape(-1), softcap=model.spec.final_softcap,
                 label_smoothing=label_smoothing, num_items_in_batch=29, extra_weight=extra)
    ref = _reference_loss(model, ids, labels, label_smoothing=label_smoothing, num_items_in_batch=29)
    assert rel_err(loss, ref) <= 1e-6
    for g, r in zip(_grads(model, loss), _grads(model, ref)):
        assert r.abs().max() > 0
        assert rel_err(g, r) <= 1e-5


def test_dropout_on_the_adapter_input_only(llama_dir):
    """PEFT's lora_dropout: the mask applies to A's input, not to the base path (same mask as the reference)."""
    model = add_lora(load_model(llama_dir), r=4, alpha=8, dropout=0.3, target_modules=["lm_head"]).train()
    randomize_lora(model, scale=0.3)
    ids = random_ids()
    labels = _labels(ids)
    torch.manual_seed(11)
    loss = model(ids, labels=labels).loss
    ref = _reference_loss(model, ids, labels, dropout_seed=11)
    assert rel_err(loss, ref) <= 1e-6
    for g, r in zip(_grads(model, loss), _grads(model, ref)):
        assert rel_err(g, r) <= 1e-5
    model.eval()  # no dropout in eval: the fused loss equals the plain one
    assert rel_err(model(ids, labels=labels).loss, _reference_loss(model, ids, labels)) <= 1e-6


def test_disabled_adapter_gives_the_base_head(llama_dir):
    plain = load_model(llama_dir)
    model = add_lora(load_model(llama_dir), r=4, alpha=8, target_modules=["lm_head"])
    randomize_lora(model)
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, plain(ids).logits) > 1e-2
        with disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(model(ids, labels=ids).loss, plain(ids, labels=ids).loss, rtol=1e-6,
                                       atol=0)


# ---- (2) PEFT's initialisation, loss and gradients -----------------------------------------------------------

def _peft_model(path, targets, seed, dtype=torch.float32, r=4, alpha=8):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    torch.manual_seed(seed)
    return peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))




@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_seed_gives_peft_initialisation(llama_dir, dtype):
    pm = _peft_model(llama_dir, PROJ + ["lm_head"], seed=5, dtype=getattr(torch, dtype))
    ours = add_lora(load_model(llama_dir, dtype=dtype), r=4, alpha=8, seed=5, target_modules=["all-linear", "lm_head"])
    for kind in ("lora_A", "lora_B"):
        theirs, mine = _peft_lora(pm, kind), _ours_lora(ours, kind)
        assert list(theirs) == list(mine) and len(mine) == 15 and list(mine)[-1] == f"lm_head.{kind}"
        for n in mine:
            assert mine[n].dtype == torch.float32
            assert torch.equal(theirs[n], mine[n]), n
    # the meta-device path (FSDP2 loading) recomputes the same A
    initial = initial_lora_A(ours)
    assert torch.equal(initial["lm_head.lora_A"], ours.lm_head.lora_A)
    assert list(initial) == list(_ours_lora(ours, "lora_A"))


def test_peft_gives_the_same_loss_and_grads(llama_dir):
    targets = ["q_proj", "v_proj", "up_proj", "lm_head"]
    pm = _peft_model(llama_dir, targets, seed=3)
    ours = add_lora(load_model(llama_dir), r=4, alpha=8, seed=3, target_modules=targets)
    theirs_B, mine_B = _peft_lora(pm, "lora_B"), _ours_lora(ours, "lora_B")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0 so every gradient (A's too) is non-trivial; same values on both sides
        for n in mine_B:
            b = torch.randn(mine_B[n].shape, generator=g) * 0.2
            mine_B[n].copy_(b)
            theirs_B[n].copy_(b)
    pm.train()
    ours.train()
    ids = random_ids()
    labels = _labels(ids)
    lt = pm(input_ids=ids, labels=labels).loss
    lm = ours(ids, labels=labels).loss
    assert rel_err(lm, lt) <= 1e-5
    lt.backward()
    lm.backward()
    for kind in ("lora_A", "lora_B"):
        theirs, mine = _peft_lora(pm, kind), _ours_lora(ours, kind)
        for n in mine:
            assert mine[n].grad.abs().max() > 0, n
            assert rel_err(mine[n].grad, theirs[n].grad) <= 1e-5, n


# ---- (3) PEFT's adapter format, both ways --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_export_to_peft_reproduces_logits(tmp_path, family):
    base = tmp_path / "base"
    save_tiny_hf(base, family)
    model = add_lora(load_model(base), r=4, alpha=8, target_modules=["q_proj", "gate_proj", "lm_head"])
    randomize_lora(model)
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
        with disable_adapters(model):
            assert rel_err(ours, model(ids).logits) > 1e-2
        model.lm_head.disabled = True
        without_head = model(ids).logits
        model.lm_head.disabled = False
    assert rel_err(ours, without_head) > 1e-2, "the lm_head adapter does not change the logits"
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" in cfg["target_modules"] and cfg["modules_to_save"] is None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("base_model.model.lm_head.lora_B.weight"), model.lm_head.lora_B.detach())
    assert {"base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"} <= keys
    assert rel_err(_peft_logits(base, tmp_path / "adapter", ids), ours) <= FP32_TOL
    if family == "phi3":
        return  # Phi-3's fused q/k/v, gate/up go out at rank 3r / 2r, lm_head at r: fasttune loads one rank only
    # and back into a fresh fasttune model
    again = load_adapter(load_model(base), tmp_path / "adapter")
    assert isinstance(again.lm_head, LoraLMHead)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_peft_adapter_with_lm_head_loads_into_fasttune(tmp_path, family):
    base = tmp_path / "base"
    hf = save_tiny_hf(base, family)
    targets = ["qkv_proj", "lm_head"] if family == "phi3" else ["q_proj", "down_proj", "lm_head"]
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.eval().save_pretrained(tmp_path / "peft")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        # PEFT saves the targeted output layer's base weight too (save_embedding_layers="auto")
        assert "base_model.model.lm_head.base_layer.weight" in set(f.keys())
    ids = random_ids()
    with torch.no_grad():
        theirs = pm(ids).logits
    model = load_adapter(load_model(base), tmp_path / "peft")
    assert isinstance(model.lm_head, LoraLMHead) and "lm_head" in model.lora_config.target_modules
    assert not model.lm_head.base.weight.requires_grad and not model.lm_head.lora_B.requires_grad
    with torch.no_grad():
        assert rel_err(model(ids).logits, theirs) <= FP32_TOL
    save_adapter(model, tmp_path / "again")
    assert rel_err(_peft_logits(base, tmp_path / "again", ids), theirs) <= FP32_TOL
    # trainable=True: the adapters train, the base output weight stays frozen
    model = load_adapter(load_model(base), tmp_path / "peft", trainable=True)
    assert model.lm_head.lora_A.requires_grad and not model.lm_head.base.weight.requires_grad


# ---- (4) merged and GGUF export ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_merged_export_equals_the_lora_model(tmp_path, family):
    base = tmp_path / "base"
    save_tiny_hf(base, family, **({"tie_word_embeddings": False} if family == "gemma2" else {}))
    model = add_lora(load_model(base), r=4, alpha=8, target_modules=["k_proj", "lm_head"])
    randomize_lora(model)
    plain = load_model(base)
    state = merged_state_dict(model)
    assert set(state) == set(plain.state_dict())
    head = model.lm_head
    expected = plain.lm_head.weight.double() + head.scaling * (head.lora_B.double() @ head.lora_A.double())
    assert (state["lm_head.weight"].double() - expected).abs().max() < 1e-6
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
    export_merged(model, tmp_path / "merged", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                           attn_implementation="eager")
    with torch.no_grad():
        assert rel_err(hf.eval()(ids).logits, ours) <= FP32_TOL
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert rel_err(merged(ids).logits, ours) <= FP32_TOL


def test_gguf_output_tensor_is_the_merged_head(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from fasttune.export.gguf_writer import export_gguf

    d = tmp_path / "base"
    save_tiny_hf(d, "qwen2", vocab_size=4013)  # the tiny tokenizer's vocabulary
    for f in TINY.glob("*token*.json"):
        shutil.copy(f, d / f.name)
    model = add_lora(load_model(d), r=4, alpha=8, target_modules=["lm_head"])
    randomize_lora(model)
    export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=d, quant="f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    out = {t.name: t for t in reader.tensors}["output.weight"]
    got = gguf.quants.dequantize(out.data, out.tensor_type).reshape([int(x) for x in reversed(out.shape)])
    want = model.lm_head.merged_weight()
    assert rel_err(torch.from_numpy(np.array(got)), model.lm_head.base.weight) > 1e-3  # the adapter is in
    np.testing.assert_array_equal(got, want.numpy())


# ---- (5) refusals and target names ---------------------------------------------------------------------------

def test_tied_embeddings_are_refused_with_what_to_do(tmp_path):
    save_tiny_hf(tmp_path / "tied", "llama", tie_word_embeddings=True)
    model = load_model(tmp_path / "tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"ties its input and output embeddings.*Remove 'lm_head' from target_modules"):
        add_lora(model, target_modules=["q_proj", "lm_head"])
    assert getattr(model, "lora_config", None) is None and not list(lora_layers(model))  # left untouched
    add_lora(model, target_modules="all-linear")  # the seven projections still work on it
    # a PEFT adapter with an lm_head LoRA cannot go onto a tied model either
    save_tiny_hf(tmp_path / "untied", "llama")
    src = add_lora(load_model(tmp_path / "untied"), r=4, alpha=8, target_modules=["lm_head"])
    save_adapter(src, tmp_path / "adapter")
    with pytest.raises(ValueError, match="ties its input and output embeddings"):
        load_adapter(load_model(tmp_path / "tied"), tmp_path / "adapter")


def test_target_names(llama_dir):
    assert normalize_targets("all") == normalize_targets("all-linear") == tuple(PROJ)  # no lm_head: as PEFT
    assert normalize_targets(None) == tuple(PROJ)
    assert normalize_targets(["all-linear", "lm_head"]) == tuple(PROJ) + ("lm_head",)
    assert normalize_targets("lm_head,q") == ("q_proj", "lm_head")
    assert normalize_targets(["lm_head", "down_proj"]) == ("down_proj", "lm_head")
    with pytest.raises(ValueError, match="lm_head"):
        normalize_targets(["embed_tokens"])
    with pytest.raises(ValueError, match="train_lm_head"):
        add_lora(load_model(llama_dir), target_modules=["lm_head"], train_lm_head=True)


def test_param_groups_put_the_head_adapter_with_the_adapters(llama_dir):
    model = add_lora(load_model(llama_dir), r=4, alpha=8, target_modules=["q_proj", "lm_head"])
    groups = fasttune.adapters.param_groups(model, lr=1e-3, embedding_lr_ratio=0.1)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    assert {id(p) for p in groups[0]["params"]} == {id(p) for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)}
    assert model.lm_head.weight is model.lm_head.base.weight and model.device == torch.device("cpu")


# ---- (6) a short training run --------------------------------------------------------------------------------

def _small_untied_model(path: Path) -> Path:
    from test_train import make_small_model

    return make_small_model(path, tied=False)


def _train_config(model_dir, out):
    from fasttune.train import TrainConfig

    (out / "cfg.yaml").write_text(f"""
model: {{path: "{model_dir}", max_seq_length: 96, device: cpu}}
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj, lm_head]}}
data: {{path: "bundled:instructions", max_examples: 24, eval_fraction: 0.1}}
objective: {{type: sft}}
train: {{output_dir: "{out / 'run'}", max_steps: 3, batch_size: 2, grad_accum: 1, lr: 0.01, progress: false,
        tensorboard: false, plot: false}}
""")
    return TrainConfig.from_yaml(out / "cfg.yaml")


def test_training_run_moves_the_head_adapter(tmp_path):
    from fasttune.build import load_trained
    from fasttune.train import Trainer

    model_dir = _small_untied_model(tmp_path / "model")
    cfg = _train_config(model_dir, tmp_path)
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "lm_head"]
    trainer = Trainer(cfg)
    head = trainer.model.lm_head
    assert isinstance(head, LoraLMHead) and head.lora_B.requires_grad and not head.base.weight.requires_grad
    base_before = head.base.weight.detach().clone()
    assert not head.lora_B.any()
    result = trainer.train()
    assert head.lora_B.abs().max() > 0, "lm_head's B did not move"
    assert torch.equal(head.base.weight, base_before)
    # what the run saved reloads onto the base, and its PEFT copy names lm_head
    model, _ = load_trained(result.adapter_dir, device="cpu", dtype="float32")
    ids = torch.tensor([[0, 5, 9, 33, 70]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trainer.model(ids).logits, rtol=0, atol=1e-6)
    peft_cfg = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert "lm_head" in peft_cfg["target_modules"]
    again = load_adapter(load_model(model_dir), result.adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_trainer_gives_the_head_adapter_the_adapter_learning_rate(tmp_path):
    from fasttune.train import Trainer

    cfg = _train_config(_small_untied_model(tmp_path / "model"), tmp_path)
    trainer = Trainer(cfg)
    opt = trainer._optimizer()
    head = {id(trainer.model.lm_head.lora_A), id(trainer.model.lm_head.lora_B)}
    for g in opt.param_groups:
        if head & {id(p) for p in g["params"]}:
            assert g["lr"] == cfg.train.lr


def test_training_embeddings_keeps_a_lora_heads_base_frozen(tmp_path):
    """objective.train_embeddings (on by default for pretrain) trains embed_tokens in full; a LoRA'd lm_head is
    adapted through its adapters, its base weight stays frozen (and the trained model still runs)."""
    from fasttune.train import Trainer, TrainConfig

    cfg = _train_config(_small_untied_model(tmp_path / "model"), tmp_path)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "objective": {"type": "pretrain"},
                                 "data": {"path": "bundled:corpus", "max_examples": 24}})
    assert cfg.train_embeddings
    trainer = Trainer(cfg)
    head = trainer.model.lm_head
    base_before = head.weight.detach().clone()
    emb_before = trainer.model.model.embed_tokens.weight.detach().clone()
    assert not head.weight.requires_grad and trainer.model.model.embed_tokens.weight.requires_grad
    trainer.train()
    assert torch.equal(head.weight, base_before)
    assert not torch.equal(trainer.model.model.embed_tokens.weight, emb_before)
    ids = torch.randint(5, 100, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(trainer.model(ids).logits).all()
