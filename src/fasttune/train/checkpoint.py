"""Training checkpoints: trainable weights, optimizer, scheduler, data position and RNG states, written atomically.

Layout: <output_dir>/checkpoints/step-000120/{trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt,
trainer_state.json}. A checkpoint is first written to a hidden temporary folder next to it and then renamed
into place (one `os.replace`, atomic on POSIX), so a crash mid-write never leaves a half checkpoint that
`--resume` would pick; only the newest `keep_last` are kept.

Under FSDP2 the trainable weights and optimizer state are written sharded instead (`sharded/`, through
torch.distributed.checkpoint: each rank writes its own piece, nothing is gathered): a full fine-tune of a model
too big for one GPU has optimizer state too big for one host. torch.distributed.checkpoint reshards on load, so
such a checkpoint resumes on any number of processes, one included.
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


SHARDED = "sharded"


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's trainable weights and optimizer state (DTensor shards under FSDP2), frozen weights left out."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                           get_optimizer_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optimizer, options=options)}


def save_sharded_checkpoint(output_dir: str | os.PathLike, step: int, *, model, optimizer, scheduler,
                            trainer_state: dict, keep_last: int, is_main: bool, barrier) -> Path:
    """Every rank calls this. Weights and optimizer state go to `sharded/` (one file a rank), the rest is written
    by rank 0; the folder is renamed into place only after every rank has finished writing."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-sharded"  # one name for all ranks
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp / SHARDED))
    barrier()
    if is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SHARDED).is_dir()


def load_sharded_weights_and_optimizer(path: str | os.PathLike, model, optimizer) -> None:
    """Load `sharded/` into this process's model and optimizer, whatever the world size was when it was written
    (every rank calls this; a single process reads every piece)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                           set_optimizer_state_dict)

    state = _sharded_state(model, optimizer)  # the shapes and placements to read into
    dcp.load(state, checkpoint_id=str(Path(path) / SHARDED))  # raises if a trainable tensor is not in the checkpoint
    # strict=False: the frozen base is not in a checkpoint; it comes from the model folder
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Everything but a sharded checkpoint's weights and optimizer state (see load_sharded_weights_and_optimizer),
    which are then None."""
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a fasttune checkpoint (no trainer_state.json)")
    sharded = is_sharded_checkpoint(path)
    return {
        "weights": None if sharded else load_file(str(path / "trainable.safetensors")),
        "optimizer": None if sharded else torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False),
        "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }
