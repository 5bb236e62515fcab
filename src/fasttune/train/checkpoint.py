"""Training checkpoints: trainable weights, optimizer, scheduler, data position and RNG states, written atomically.

Layout: <output_dir>/checkpoints/step-000120/{trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt,
trainer_state.json}. A checkpoint is first written to a hidden temporary folder next to it and then renamed
into place (one `os.replace`, atomic on POSIX), so a crash mid-write never leaves a half checkpoint that
`--resume` would pick; only the newest `keep_last` are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Trainable parameters of each named module, as `<module>.<param name>` -> tensor (tied weights once)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                t = p.detach()
                if hasattr(t, "full_tensor"):  # FSDP2 shard: gather (every rank must call this)
                    t = t.full_tensor()
                out[f"{prefix}.{name}"] = t.contiguous().cpu()
    return out


def load_trainable_state(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], where: str) -> None:
    params = {}
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            params[f"{prefix}.{name}"] = p
    missing = [k for k in state if k not in params]
    if missing:
        raise RuntimeError(f"{where} holds tensors this model does not have (e.g. {missing[:3]}); was it written for "
                           "a different model, LoRA configuration or objective?")
    expected = set(trainable_state(modules))
    absent = sorted(expected - set(state))
    if absent:
        raise RuntimeError(f"{where} lacks trainable tensors of this model (e.g. {absent[:3]}); was it written with a "
                           "different LoRA configuration?")
    with torch.no_grad():
        for k, v in state.items():
            p = params[k]
            v = v.to(p.dtype)
            if hasattr(p, "device_mesh"):  # FSDP2 shard: keep this rank's piece
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            p.copy_(v)


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, weights: dict[str, torch.Tensor],
                    optimizer_state: dict, scheduler, trainer_state: dict, keep_last: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a fasttune checkpoint (no trainer_state.json)")
    return {
        "weights": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False),
        "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }
