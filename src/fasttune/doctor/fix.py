"""`fasttune doctor --fix OUT_DIR`: write a repaired copy of the model folder.

Config repairs are applied first (to a staging folder whose weights are symlinks to the original shards), so a
config that would not load - a wrong vocab_size, a wrong tie flag - loads once repaired. Then the model is
loaded with fasttune's loader, untrained rows are set to the mean of the trained rows (embedding and LM head),
a distinct pad token is installed, and `save_model` writes everything in the config's dtype."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..models.checkpoint import copy_tokenizer_files, load_model, save_model
from .context import ModelFolder
from .report import Report


def _stage(folder: ModelFolder, config: dict, where: Path) -> Path:
    stage = where / "stage"
    stage.mkdir()
    (stage / "config.json").write_text(json.dumps(config, indent=2))
    for f in folder.path.iterdir():
        if f.name == "config.json" or not f.is_file():
            continue
        try:
            os.symlink(f.resolve(), stage / f.name)
        except OSError:  # filesystems without symlinks
            shutil.copy2(f, stage / f.name)
    return stage


def mean_of_trained_rows(weight: torch.Tensor, untrained: list[int]) -> torch.Tensor:
    mask = torch.ones(weight.shape[0], dtype=torch.bool)
    mask[untrained] = False
    return weight[mask].double().mean(0).to(weight.dtype)


def repair(folder: ModelFolder, report: Report, out_dir: str | os.PathLike) -> list[str]:
    """Apply every automatic repair in `report`; return what was done (one line each)."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == folder.path.resolve():
        raise ValueError("--fix must name a new folder, not the model folder itself")
    repairs = [f.repair for f in report.findings if f.repair]
    done: list[str] = []
    config = dict(folder.config)
    gen_config = dict(folder.generation_config)
    for r in repairs:
        for k, v in r.get("config", {}).items():
            config[k] = v
            done.append(f"config.json: {k} = {v}")
        for k, v in r.get("generation_config", {}).items():
            gen_config[k] = v
            done.append(f"generation_config.json: {k} = {v}")
    mean_ids = sorted({i for r in repairs for i in r.get("mean_rows", [])})
    pad_token = next((r["pad_token"] for r in repairs if "pad_token" in r), None)

    with tempfile.TemporaryDirectory() as tmp:
        stage = _stage(folder, config, Path(tmp))
        model = load_model(stage)
        tokenizer = folder.tokenizer
        embed = model.model.embed_tokens.weight
        with torch.no_grad():
            if mean_ids:
                matrices = [("embedding", embed)]
                if not model.spec.tie_word_embeddings:
                    matrices.append(("LM head", model.lm_head.weight))
                for label, w in matrices:
                    w[mean_ids] = mean_of_trained_rows(w, mean_ids)
                done.append(f"set {len(mean_ids)} untrained row(s) to the trained-row mean in "
                            f"{' and '.join(m for m, _ in matrices)}")
            state = None
            if pad_token is not None and tokenizer is None:  # say so rather than claim a repair
                done.append(f"pad token NOT changed to {pad_token!r}: the tokenizer did not load")
            if pad_token is not None and tokenizer is not None:
                tokenizer.add_special_tokens({"pad_token": pad_token})
                pad_id = tokenizer.pad_token_id
                config["pad_token_id"] = pad_id
                done.append(f"pad token = {pad_token!r} (id {pad_id}); config pad_token_id = {pad_id}")
                rows = embed.shape[0]
                if len(tokenizer) > rows:
                    state = _grown_state(model, len(tokenizer), mean_ids)
                    config["vocab_size"] = len(tokenizer)
                    done.append(f"embedding grown from {rows} to {len(tokenizer)} rows (new rows = trained-row mean)")
        model.spec.raw_config = config
        model.spec.vocab_size = config["vocab_size"]
        save_model(model, out_dir, tokenizer=tokenizer, state_dict=state)
        if tokenizer is None:
            copy_tokenizer_files(folder.path, out_dir)
        if gen_config:
            if "pad_token_id" in config and "pad_token_id" in gen_config:
                gen_config["pad_token_id"] = config["pad_token_id"]
            (out_dir / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
    if any(r.get("resave") for r in repairs):
        done.append(f"weights re-saved as {config.get('torch_dtype') or config.get('dtype')}")
    return done


def _grown_state(model, new_rows: int, untrained: list[int]) -> dict[str, torch.Tensor]:
    state = {n: p.detach() for n, p in model.state_dict().items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in state:
            continue
        w = state[name]
        extra = mean_of_trained_rows(w, untrained).expand(new_rows - w.shape[0], -1)
        state[name] = torch.cat([w, extra], 0)
    return state
