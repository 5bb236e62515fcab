"""Training checkpoints: trainable weights, optimizer, scheduler, data position and RNG states, written atomically.

Layout: <output_dir>/checkpoints/step-000120/{trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt,
trainer_state.json}. A checkpoint is first written to a hidden temporary folder next to it (`.tmp-step-...`) and
then renamed into place (one `os.replace`, atomic on POSIX), so a crash mid-write never leaves a half checkpoint
that `--resume` would pick; only the newest `keep_last` are kept.

Saving a step that already has a checkpoint (e.g. Ctrl-C right after a periodic save) never deletes the old one
before the new one is in place: the old folder is renamed aside (`.old-step-...`), the new one renamed in, and only
then is the old one deleted. A crash between the two renames leaves the complete old checkpoint under its aside
name, which `list_checkpoints` falls back to when `step-N` itself is missing; a crash after them leaves a stale
aside folder that `step-N` shadows (and the next save removes). Temporary folders are never checkpoints.

Under FSDP2 the trainable weights and optimizer state are written sharded instead (`sharded/`, through
torch.distributed.checkpoint: each rank writes its own piece, nothing is gathered): a full fine-tune of a model
too big for one GPU has optimizer state too big for one host. torch.distributed.checkpoint reshards on load, so
such a checkpoint resumes on any number of processes, one included.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
TMP_PREFIX = ".tmp-"  # being written: never a checkpoint
ASIDE_PREFIX = ".old-"  # a complete checkpoint moved aside while the same step is re-saved
_STEP = re.compile(rf"{PREFIX}(\d+)")
_ASIDE = re.compile(rf"{re.escape(ASIDE_PREFIX)}{PREFIX}(\d+)-.+")
_TMP = re.compile(rf"{re.escape(TMP_PREFIX)}{PREFIX}(\d+)-")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _complete(p: Path) -> bool:
    return p.is_dir() and (p / "trainer_state.json").is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first: `step-N` folders holding trainer_state.json. Temporary folders and other
    names are ignored; an aside folder of a re-save counts only for a step whose `step-N` is missing (a crash
    between moving the old checkpoint aside and renaming the new one in)."""
    root = checkpoint_root(output_dir)
    if not root.exists():
        return []
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    for p in root.iterdir():
        if m := _STEP.fullmatch(p.name):
            if _complete(p):
                found[int(m.group(1))] = p
        elif (m := _ASIDE.fullmatch(p.name)) and _complete(p):
            aside.setdefault(int(m.group(1)), p)
    for step, p in aside.items():
        found.setdefault(step, p)
    return [found[k] for k in sorted(found)]


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
                    optimizer_state: dict, scheduler, trainer_state: dict, keep_last: int, rng: dict | None = None
                    ) -> Path:
    """`rng`: the RNG state to store (default: the current one), written before the rename like everything else."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{TMP_PREFIX}{PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    _publish(tmp, final, output_dir, keep_last)
    return final


def _publish(tmp: Path, final: Path, output_dir, keep_last: int) -> None:
    """Rename the finished `tmp` to `final`, replacing an existing checkpoint of the same step (e.g. Ctrl-C right
    after a periodic save) without a moment in which neither is on disk, then prune to the newest `keep_last`."""
    root = final.parent
    if final.exists():
        aside = root / f"{ASIDE_PREFIX}{final.name}-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)  # a crash from here ...
        os.replace(tmp, final)  # ... to here leaves the complete old checkpoint as `aside` (list_checkpoints)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    # leftovers of crashed saves: temporary folders of steps up to this one (none is being written now: only one
    # process publishes, after every rank has finished), and aside folders that are incomplete or shadowed by their
    # step-N; before pruning, so that pruning a step-N never lets a stale aside of it stand in for it
    newest = int(_STEP.fullmatch(final.name).group(1))
    live = set(list_checkpoints(output_dir))
    for p in root.iterdir():
        if m := _TMP.match(p.name):
            if int(m.group(1)) <= newest:
                shutil.rmtree(p, ignore_errors=True)
        elif _ASIDE.fullmatch(p.name) and p not in live:
            shutil.rmtree(p, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


SHARDED = "sharded"


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's trainable weights and optimizer state (DTensor shards under FSDP2), frozen weights left out."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                           get_optimizer_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optimizer, options=options)}


def save_sharded_checkpoint(output_dir: str | os.PathLike, step: int, *, model, optimizer, scheduler,
                            trainer_state: dict, keep_last: int, is_main: bool, barrier, rng: dict | None = None
                            ) -> Path:
    """Every rank calls this. Weights and optimizer state go to `sharded/` (one file a rank), the rest is written
    by rank 0; the folder is renamed into place only after every rank has finished writing."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{TMP_PREFIX}{PREFIX}{step:06d}-sharded"  # one name for all ranks
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
        torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        _publish(tmp, final, output_dir, keep_last)
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
