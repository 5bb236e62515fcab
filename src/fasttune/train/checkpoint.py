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

Nothing read back from a checkpoint can run code: the `.pt` files are loaded with `torch.load(weights_only=True)`
(tensors, numbers, strings, lists, tuples and dicts only; the RNG states are such values already), the weights are
safetensors, the trainer state is JSON, and a sharded checkpoint's pickled index is read by an unpickler that allows
only torch.distributed.checkpoint's own metadata classes. Anything else is refused with a `CheckpointError`.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..adapters.files import TRAINED_WEIGHTS
from ..models.checkpoint import CheckpointError as _CheckpointError
from . import run_folder

PREFIX = "step-"
TMP_PREFIX = ".tmp-"  # being written: never a checkpoint
ASIDE_PREFIX = ".old-"  # a complete checkpoint moved aside while the same step is re-saved
_STEP = re.compile(rf"{PREFIX}(\d+)")
_ASIDE = re.compile(rf"{re.escape(ASIDE_PREFIX)}{PREFIX}(\d+)-.+")
_TMP = re.compile(rf"{re.escape(TMP_PREFIX)}{PREFIX}(\d+)-")


# one error for checkpoints a user cannot use, model folders and training checkpoints alike (unsafe, corrupt,
# written for another model or config): the message names the file and what to do
CheckpointError = _CheckpointError


class DiskFull(CheckpointError):
    """The disk filled up while a checkpoint or adapter was written; nothing half-written was left behind."""


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


def set_rng_state(state: dict, where: str = "rng.pt") -> None:
    try:
        py = state["python"]
        # random.setstate takes (version, 625 ints, gauss) as a tuple; weights_only loading keeps tuples
        random.setstate((py[0], tuple(py[1]), py[2]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where} does not hold valid RNG states ({type(e).__name__}: {str(e)[:80]}); the "
                              "checkpoint is corrupt: resume from another checkpoint") from None


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
        raise CheckpointError(f"{where} holds tensors this model does not have (e.g. {missing[:3]}); it was written "
                              "for a different model, LoRA configuration or objective: resume with that config, or "
                              "start a new run")
    expected = {f"{prefix}.{name}" for prefix, module in modules.items()
                for name, p in module.named_parameters() if p.requires_grad}
    absent = sorted(expected - set(state))
    if absent:
        raise CheckpointError(f"{where} lacks trainable tensors of this model (e.g. {absent[:3]}); it was written "
                              "with a different LoRA configuration: resume with that config, or start a new run")
    for k, v in state.items():
        shape = tuple(params[k].shape) if not hasattr(params[k], "device_mesh") else tuple(params[k].size())
        if tuple(v.shape) != shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(v.shape)}, this model's has {shape}; the "
                                  "checkpoint was written for a different model or lora.r: resume with that config, "
                                  "or start a new run")
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
    with _cleaned_up_on_failure(tmp, output_dir, step):
        save_file(weights, str(tmp / TRAINED_WEIGHTS), metadata={"format": "pt"})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    _publish(tmp, final, output_dir, keep_last)
    return final


class _cleaned_up_on_failure:
    """Remove a half-written checkpoint folder when writing it fails, and say "disk full" (naming the newest
    complete checkpoint) instead of torch's `unexpected pos` when that is why."""

    def __init__(self, tmp: Path, output_dir, step: int):
        self.tmp, self.output_dir, self.step = tmp, output_dir, step

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None:
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(err, Exception) and run_folder.is_disk_full(err):
            last = latest_checkpoint(self.output_dir)
            raise DiskFull(f"disk full while writing the checkpoint of step {self.step} in "
                           f"{checkpoint_root(self.output_dir)} (nothing half-written was left); the last good "
                           + (f"checkpoint is {last}: " if last else "checkpoint: none yet; ")
                           + "free space (or lower train.keep_last) and resume with --resume") from None
        return False


def _publish(tmp: Path, final: Path, output_dir, keep_last: int) -> None:
    """Rename the finished `tmp` to `final`, replacing an existing checkpoint of the same step (e.g. Ctrl-C right
    after a periodic save) without a moment in which neither is on disk, then prune to the newest `keep_last`."""
    root = final.parent
    # a crash between replace_dir's two renames leaves the complete old checkpoint as the aside (list_checkpoints)
    run_folder.replace_dir(tmp, final, aside=root / f"{ASIDE_PREFIX}{final.name}-{os.getpid()}")
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
        with _cleaned_up_on_failure(tmp, output_dir, step):
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
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                           set_optimizer_state_dict)

    state = _sharded_state(model, optimizer)  # the shapes and placements to read into
    _read_sharded(state, Path(path) / SHARDED)  # raises if a trainable tensor is not in the checkpoint
    # strict=False: the frozen base is not in a checkpoint; it comes from the model folder
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)


def _load_pt(path: Path):
    """torch.load that never unpickles arbitrary objects (weights_only); any refusal is one clear error."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; resume from another checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        what = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), "")[:120]
        raise CheckpointError(f"{path} holds Python objects other than tensors and plain values ({what or 'refused'}); "
                              "fasttune never unpickles them because loading one can run code: delete this "
                              "checkpoint, or resume from one fasttune wrote") from None
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path} is corrupt or not a PyTorch file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:100] if str(e).strip() else ''}); resume from "
                              "another checkpoint") from None


_POSITION = ("step", "epoch", "batch_index")  # what a resume reads back: non-negative integers


def read_trainer_state(path: str | os.PathLike, for_resume: bool = False) -> dict:
    """trainer_state.json of a checkpoint: `step` must be valid, and with `for_resume` the whole data position."""
    f = Path(path) / "trainer_state.json"
    if not f.is_file():
        raise CheckpointError(f"{path} is not a fasttune checkpoint (no trainer_state.json); pass a "
                              "checkpoints/step-N folder")
    try:
        state = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({str(e)[:80]}); the checkpoint is corrupt: resume from "
                              "another checkpoint") from None
    keys = _POSITION if for_resume else _POSITION[:1]
    bad = [k for k in keys if not isinstance(state, dict) or not isinstance(state.get(k), int)
           or isinstance(state.get(k), bool) or state.get(k) < 0]
    if bad:
        raise CheckpointError(f"{f} lacks valid {', '.join(bad)}; the checkpoint is corrupt: resume from another "
                              "checkpoint")
    return state


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Everything but a sharded checkpoint's weights and optimizer state (see load_sharded_weights_and_optimizer),
    which are then None. Raises CheckpointError for an unsafe, corrupt or incomplete checkpoint."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    sharded = is_sharded_checkpoint(path)
    weights = None
    if not sharded:
        f = path / TRAINED_WEIGHTS
        try:
            weights = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is missing or corrupt ({str(e)[:100]}); resume from another "
                                  "checkpoint") from None
    return {
        "weights": weights,
        "optimizer": None if sharded else _load_pt(path / "optimizer.pt"),
        "scheduler": _load_pt(path / "scheduler.pt"),
        "rng": _load_pt(path / "rng.pt"),
        "trainer_state": trainer_state,
    }


# ---- sharded checkpoints, read safely ----------------------------------------------------------------------------

# torch.distributed.checkpoint pickles its index (`.metadata`) and reads non-tensor items with an unrestricted
# torch.load; fasttune reads both itself, allowing only these globals in the index
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "StorageMeta",
                                              "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _DCP_GLOBALS.get(module, ()) or (
                module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


@functools.cache
def _dcp_classes():
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            f = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(f, "rb") as fh:
                    metadata = _IndexUnpickler(fh).load()
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{f} holds Python objects other than a checkpoint index ({str(e)[:100]}); "
                                      "fasttune never unpickles them because loading one can run code: delete this "
                                      "checkpoint, or resume from one fasttune wrote") from None
            except Exception as e:
                raise CheckpointError(f"{f} is missing or corrupt ({type(e).__name__}: {str(e)[:80]}); resume from "
                                      "another checkpoint") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:  # the same bytes, refused unless they hold only tensors and plain values ...
                torch.load(value, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                raise CheckpointError(
                    f"sharded checkpoint item {read_item.dest_index.fqn} holds Python objects other than tensors and "
                    "plain values; fasttune never unpickles them because loading one can run code: delete this "
                    "checkpoint, or resume from one fasttune wrote") from None
            value.seek(0)
            super().load_bytes(read_item, value)  # ... so that re-reading them as DefaultLoadPlanner does is safe

    return SafeReader, SafeLoadPlanner


def _safe_reader(path):
    return _dcp_classes()[0](str(path))


def _safe_planner():
    return _dcp_classes()[1]()


def _read_sharded(state: dict, folder: Path, no_dist: bool = False) -> None:
    """dcp.load through the safe reader and planner, their refusals raised as themselves (dcp would wrap them in
    a many-line CheckpointException of its own)."""
    import torch.distributed.checkpoint as dcp

    reader = _safe_reader(folder)
    reader.read_metadata()  # the index first: a refusal here is raised as is
    try:
        dcp.load(state, storage_reader=reader, planner=_safe_planner(), no_dist=no_dist)
    except BaseException as e:  # dcp's CheckpointException derives from BaseException
        # it maps each rank to (exception, traceback): raise our own refusal as is
        for failure in getattr(e, "failures", {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, CheckpointError):
                raise inner from None
        raise


# ---- the last good checkpoint after a divergence -----------------------------------------------------------------

BLOWUP = 1e3  # a checkpoint whose largest trainable |w| exceeds BLOWUP x max(1, reference) is not "good"


def weight_scale(tensors) -> tuple[bool, float]:
    """(all finite, largest |value|) over float tensors."""
    finite, largest = True, 0.0
    for t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        m = float(t.detach().abs().max())  # NaN and inf propagate through max
        finite = finite and math.isfinite(m)
        largest = max(largest, m) if math.isfinite(m) else largest
    return finite, largest


def _checkpoint_tensors(path: Path):
    """The trainable weights of a checkpoint, one tensor at a time (sharded: read through the safe reader)."""
    if is_sharded_checkpoint(path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = _safe_reader(path / SHARDED).read_metadata()
        target = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
                  for k, md in meta.state_dict_metadata.items()
                  if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}
        _read_sharded(target, path / SHARDED, no_dist=True)
        yield from target.values()
        return
    with safe_open(str(path / TRAINED_WEIGHTS), framework="pt") as f:
        for k in f.keys():
            yield f.get_tensor(k)


def checkpoint_weight_scale(path: str | os.PathLike) -> tuple[bool, float] | None:
    """(finite, largest |w|) of a checkpoint's trainable weights; None when they cannot be read."""
    try:
        return weight_scale(_checkpoint_tensors(Path(path)))
    except Exception:
        return None


def last_good_checkpoint(output_dir: str | os.PathLike, reference: float | None = None) -> Path | None:
    """The newest checkpoint whose trainable weights are all finite and not blown up: largest |w| at most
    BLOWUP x max(1, reference). `reference` is the largest |w| when the run started (the trainer measures it);
    without it, the oldest readable finite checkpoint's is used. A learning rate of 1e9 gives a step-1 checkpoint
    with |w| ~ 1e9: finite, yet no place to resume from."""
    found = list_checkpoints(output_dir)
    scales = {p: checkpoint_weight_scale(p) for p in found}
    if reference is None:
        reference = next((s[1] for p in found if (s := scales[p]) is not None and s[0]), None)
    limit = BLOWUP * max(1.0, reference or 0.0)
    for p in reversed(found):
        s = scales[p]
        if s is not None and s[0] and s[1] <= limit:
            return p
    return None
