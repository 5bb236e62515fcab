"""Loading streams tensors: peak host memory stays near one copy of the model (issue 2)."""
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file

from fasttune.models.spec import ArchSpec


def test_peak_rss_near_one_model_copy(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 2048,
           "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": False,
           "torch_dtype": "float32"}
    import json
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from fasttune.models.decoder import CausalLM
    torch.manual_seed(0)
    model = CausalLM(ArchSpec.from_hf_config(cfg))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # two shards, as real checkpoints come
    names = list(state)
    save_file({k: state[k] for k in names[: len(names) // 2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[len(names) // 2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" if i < len(names) // 2
                            else "model-00002-of-00002.safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    del model, state
    script = textwrap.dedent(f"""
        import resource, torch, fasttune.models as m
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = m.load_model({str(tmp_path)!r})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(base, peak)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    base, peak = int(out[0]), int(out[1])
    grown = peak - base
    assert grown < 1.35 * model_bytes, f"loading grew RSS by {grown / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"


def test_model_is_built_on_the_meta_device_then_filled(tmp_path, monkeypatch):
    """load_model constructs the module tree on the meta device (no random-init copy of the weights, no init
    compute) and every tensor of the loaded model is then real and on the requested device."""
    import json

    from fasttune.models import checkpoint, decoder

    cfg = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = decoder.CausalLM(ArchSpec.from_hf_config(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))

    built_on = []
    real_init = decoder.CausalLM.__init__

    def recording_init(self, *args, **kwargs):
        built_on.append(torch.empty(0).device.type)  # the default device while the module tree is created
        real_init(self, *args, **kwargs)
    monkeypatch.setattr(decoder.CausalLM, "__init__", recording_init)
    loaded = checkpoint.load_model(tmp_path)
    assert built_on == ["meta"]
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_a_4bit_load_frees_each_16bit_layer_once_quantised(tmp_path):
    """QLoRA quantises shard by shard at load: when a decoder linear has been replaced by its NF4 layer, its 16-bit
    weight must be gone (not held until the load returns), so at most one layer's 16-bit weight is alive at a time."""
    import gc
    import json
    import weakref

    from fasttune.models import checkpoint, decoder
    from fasttune.models.nf4_linear import quantize_linear

    cfg = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = decoder.CausalLM(ArchSpec.from_hf_config(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    del model

    replaced: list[weakref.ref] = []
    alive_at_call: list[int] = []

    def quantize(linear):
        gc.collect()
        alive_at_call.append(sum(r() is not None for r in replaced))
        replaced.append(weakref.ref(linear.weight))
        return quantize_linear(linear)

    loaded = checkpoint.load_model(tmp_path, quantize=quantize)
    gc.collect()
    assert len(replaced) == 3 * 7
    assert max(alive_at_call) == 0, f"16-bit weights of earlier layers alive at quantisation: {alive_at_call}"
    assert all(r() is None for r in replaced)
    assert sum(isinstance(m, torch.nn.Linear) for n, m in loaded.named_modules() if ".layers." in n) == 0


def test_a_bitsandbytes_4bit_checkpoint_loads_bit_for_bit(tmp_path):
    """A folder saved by transformers from a bitsandbytes `load_in_4bit` model (NF4, double quantisation) loads
    with its stored codes and scales as they are: every decoder weight dequantises exactly as bitsandbytes'
    does, the logits match transformers' 4-bit model, and LoRA trains on top (QLoRA from a -bnb-4bit folder)."""
    import json

    import pytest

    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    import fasttune
    from fasttune.models.nf4_linear import NF4Linear

    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf16 = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)  # qwen2: q/k/v biases too
    hf16.save_pretrained(tmp_path / "bf16")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=quant,
                                                           device_map="cpu")
    hf4.save_pretrained(tmp_path / "bnb4")

    model = fasttune.load_model(tmp_path / "bnb4", device="cpu")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 2 * 7
    for name, layer in layers:
        theirs = hf4.get_submodule(name).weight
        want = bnb.functional.dequantize_4bit(theirs.data, theirs.quant_state)
        assert torch.equal(layer.dequantize(), want), name
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits.float()
        ref = hf4(ids).logits.float()
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 2e-2  # both bf16 compute, different GEMMs

    lora = fasttune.add_lora(model, r=4, alpha=8)
    loss = lora(ids, labels=ids).loss
    loss.backward()
    assert lora.model.layers[0].self_attn.q_proj.lora_B.grad is not None

    # the doctor does not mistake the float32 scale tables of a 4-bit folder for mis-typed weights
    from fasttune.doctor.checks.weights import check_dtypes
    from fasttune.doctor.context import ModelFolder

    assert [f for f in check_dtypes(ModelFolder(tmp_path / "bnb4"))] == []

    # what cannot be read is refused with what to do instead
    config = json.loads((tmp_path / "bnb4" / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_use_double_quant"] = False
    (tmp_path / "bnb4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="without double quantisation.*load the 16-bit checkpoint instead"):
        fasttune.load_model(tmp_path / "bnb4")
