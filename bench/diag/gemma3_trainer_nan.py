"""Diagnosis: `fasttune train` on the Gemma-3-12B shape stops with a NaN gradient norm at step 1, while the model's
own forward/backward on a synthetic packed batch is finite. Runs the trainer's first step on a Gemma-3 of the 12B
width with N layers; on a non-finite result, names the first modules (in backward order) whose gradients are
non-finite, and the non-finite parameter gradients."""
import json, sys, traceback, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import train_e2e as t

for layers in [int(x) for x in sys.argv[1].split(",")]:
    t.SHAPES["gemma3-12b"]["num_hidden_layers"] = layers
    work = Path("/tmp/g3t"); work.mkdir(exist_ok=True)
    data = work / "d.jsonl"; t.write_data(data, 400)
    model_dir = work / f"g3-{layers}"
    t.write_checkpoint("gemma3-12b", model_dir, "cuda")
    cfg = t.fasttune_config(model_dir, data, work / f"run-{layers}", True, 2, 2, "cuda")
    from fasttune.train.trainer import Trainer
    from fasttune.train.data import host_batch, to_device
    tr = Trainer(cfg)
    group = tr._epoch(0)[:1]
    b = group[0]
    info = {"layers": layers, "keys": sorted(b), "ids_max": int(b["input_ids"].max()), "ids_min": int(b["input_ids"].min()),
            "pad_id": tr.pad_id, "n_target": int((b["labels"] != -100).sum()),
            "pad_tokens_in_batch": int((b["input_ids"] == tr.pad_id).sum()),
            "pad_embedding_norm": float(tr.model.model.embed_tokens.weight[tr.pad_id].float().norm())}
    bad_mods = []
    def hook(name):
        def f(mod, gin, gout):
            if any(g is not None and not torch.isfinite(g).all() for g in list(gout) + list(gin)):
                bad_mods.append(name)
        return f
    hs = [m.register_full_backward_hook(hook(n)) for n, m in tr.model.named_modules() if n.startswith("model.layers.") and n.count(".") <= 4]
    try:
        rec = tr.train_step(group)
        info["ok"] = {k: rec[k] for k in ("loss", "grad_norm")}
    except Exception as e:
        info["error"] = str(e)[:160]
        info["bad_modules_backward_order"] = bad_mods[:8]
        info["bad_params"] = [n for n, p in tr.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()][:8]
        emb = tr.model.model.embed_tokens.weight
        info["emb_row_norms_of_batch_ids_min"] = float(emb[b["input_ids"].unique().cuda()].float().norm(dim=-1).min())
    print(json.dumps(info), flush=True)
    for h in hs: h.remove()
    del tr; torch.cuda.empty_cache()
    import shutil; shutil.rmtree(model_dir, ignore_errors=True)
    if "error" in info:
        break
