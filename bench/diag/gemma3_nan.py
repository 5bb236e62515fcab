"""Diagnosis: NaN gradient at step 1 for the Gemma-3-12B shape (random init, bf16, packed 2x2048)."""
import json, os, sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
variant = sys.argv[1]
layers = int(sys.argv[2])
d = Path(f"/tmp/g3diag{layers}")
if not d.exists():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(hidden_size=3840, intermediate_size=15360, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256,
        tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m = Gemma3ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    m.save_pretrained(d); del m; torch.cuda.empty_cache()
import fasttune
from fasttune.kernels.attention import DocumentLayout, FALLBACKS
if variant == "noflash":
    FALLBACKS.fail("torch-flash-varlen", "diagnosis")
if variant == "nodocs":
    pass
model, _ = fasttune.load(str(d), max_seq_length=2048)
model = fasttune.add_lora(model, r=16, alpha=16)
g = torch.Generator().manual_seed(0)
ids = torch.randint(5, 4000, (2, 2048), generator=g)
lens = [300, 700, 1048]
pos = torch.cat([torch.arange(n) for n in lens])[None].expand(2, -1).contiguous()
stats = {}
def hook(name):
    def f(mod, inp, out):
        o = out[0] if isinstance(out, tuple) else out
        stats[name] = (float(o.float().abs().max()), bool(torch.isfinite(o).all()))
    return f
for i, l in enumerate(model.model.layers):
    l.register_forward_hook(hook(f"layer{i}"))
kw = {} if variant == "nodocs" else dict(position_ids=pos.cuda(), documents=DocumentLayout.from_position_ids(pos).to("cuda"))
from fasttune.train.memory import apply_memory_policy
for policy in sys.argv[3].split(",") if len(sys.argv) > 3 else ["none"]:
    plan = apply_memory_policy(model, policy, seq_len=2048, batch_size=2)
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    out = model(ids.cuda(), labels=ids.cuda(), **kw)
    out.loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    gn = {n.split(".lora")[0][-40:]: float(p.grad.float().norm()) for n, p in model.named_parameters()
          if p.grad is not None and n.endswith("lora_B.weight") and ("layers.0." in n or "layers.47." in n or "layers.24." in n)}
    print(json.dumps({"variant": variant, "layers": layers, "policy": policy, "modes": sorted(set(plan.modes)),
                      "chunk_tokens": plan.chunk_tokens, "loss": float(out.loss), "bad_grads": bad[:6], "n_bad": len(bad),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "grad_norms": gn,
                      "layer_max": {k: v for k, v in list(stats.items())[::8]}}), flush=True)
