"""Data parallelism through PyTorch's own engines: torch.distributed with DistributedDataParallel (train.parallel:
ddp, a replica per rank) or FSDP2's fully_shard (train.parallel: fsdp, each rank holds a shard of the model).

Under `torchrun --nproc_per_node N -m fasttune train config.yaml` (or `fasttune train --gpus N`, which starts
torchrun), each rank builds the same list of micro-batches and trains on every N-th one of each step's group, so
the data is split with no overlap and nothing lost; gradients are averaged across ranks by DDP or reduced by FSDP2
(NCCL on GPUs, gloo on CPU).
Without the torchrun environment everything here is a no-op and the trainer runs as one process.

Checkpoints: under DDP, rank 0 writes the (replicated) trainable state; under FSDP2 every rank writes its shard
through torch.distributed.checkpoint (train/checkpoint.py). Either resumes on any number of processes.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(use_cuda: bool | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise.
    NCCL when training on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if use_cuda is None:
            use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def wrap(model: nn.Module, info: DistInfo, parallel: str = "ddp") -> nn.Module:
    """DDP (a replica per rank) or FSDP2 (`fully_shard` on every decoder layer, then the whole model: each rank
    holds 1/N of every parameter, gathered layer by layer for compute).

    A QLoRA base is not sharded: its NF4 codes and scales are buffers, which `fully_shard` leaves whole on every
    rank (a quarter of the bf16 size); the adapters, embeddings and LM head are parameters and are sharded.
    The trainer does not come through here with a 16-bit base under FSDP2: `load_into_shards` builds the model
    sharded from the start, so it need not fit one device."""
    if not info.enabled or is_sharded(model):  # already sharded (load_into_shards)
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtypes = {p.dtype for p in model.parameters()}
        # LoRA keeps fp32 adapters over a 16-bit base: one compute dtype per shard group, fp32 gradient reduction
        compute = model.dtype if len(dtypes) > 1 else None
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute is not None else None)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)


def load_into_shards(path: str, info: DistInfo, device: torch.device, dtype=None, lora=None) -> nn.Module:
    """A checkpoint loaded straight into FSDP2 shards, for a model too big for one device: the module tree (and its
    adapters) is built on the meta device and sharded, each rank allocates only its shards, and the checkpoint is
    streamed one tensor at a time, each rank copying its piece. `lora`: an adapters.LoraConfig; the adapters
    start from the same values add_lora gives a whole model (PEFT's init from the seed)."""
    from torch.distributed.tensor import distribute_tensor

    from ..adapters import attach_lora
    from ..adapters.attach import initial_lora_A
    from ..models.checkpoint import CheckpointError, compute_dtype, iter_model_tensors
    from ..models.decoder import CausalLM
    from ..models.spec import ArchSpec

    spec = ArchSpec.from_pretrained(path)
    torch_dtype = compute_dtype(dtype, spec)
    with torch.device("meta"):
        model = CausalLM(spec).to(torch_dtype)
    model.tie_weights()
    initial = {}
    if lora is not None:
        model = attach_lora(model, lora)
        initial = initial_lora_A(model)
    wrap(model, info, "fsdp")
    model.to_empty(device=device)
    model.mark_loaded_into_shards()
    params = dict(model.named_parameters())

    def place(name: str, full: torch.Tensor) -> None:
        p = params[name]
        with torch.no_grad():
            p.copy_(distribute_tensor(full.to(device=device, dtype=p.dtype), p.device_mesh, p.placements))

    loaded = set()
    for name, tensor in iter_model_tensors(path, spec):
        target = name if name in params else name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        if target not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in {path}: not part of a {spec.model_type} model")
        place(target, tensor)
        loaded.add(target)
        del tensor
    for name_a, value in initial.items():
        name_b = name_a.replace("lora_A", "lora_B")
        place(name_a, value)
        place(name_b, torch.zeros(params[name_b].shape))  # a DTensor's shape is the whole tensor's
        loaded.update({name_a, name_b})
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{path} is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
    return model.eval()


@contextlib.contextmanager
def _fsdp_no_sync(engine):
    engine.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        engine.set_requires_gradient_sync(True)


def no_sync(engine: nn.Module, enabled: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on all but the last micro-batch of a step."""
    if enabled and hasattr(engine, "no_sync"):
        return engine.no_sync()
    if enabled and hasattr(engine, "set_requires_gradient_sync"):
        return _fsdp_no_sync(engine)
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; a collective on every rank when sharded."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_dict(values: dict[str, float], info: DistInfo, device) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def reduce_host_numbers(values: dict[str, float], info: DistInfo, device,
                        maximum: tuple[str, ...] = ()) -> dict[str, float]:
    """Host numbers of every rank in one collective (an all-gather): summed over ranks, or their maximum for the
    keys in `maximum`. Every rank must pass the same keys."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    mine = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(every, mine)
    stacked = torch.stack(every)
    sums, peaks = torch.stack([stacked.sum(0), stacked.amax(0)]).tolist()  # one read
    return {k: p if k in maximum else s for k, s, p in zip(keys, sums, peaks)}


def all_reduce_grads(params, info: DistInfo) -> None:
    """Average gradients of parameters that live outside the DDP-wrapped model (the reward head)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup() -> bool:
    """Leave the process group, if this process joined one; says whether it had."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker once everything is written and `cleanup()` has run, skipping interpreter shutdown.

    Why: the process group outlives `destroy_process_group` (DTensor's sharding cache keeps FSDP2's DeviceMesh,
    which keeps the group), so its C++ worker threads are only torn down during interpreter shutdown; a gloo worker
    still releasing a finished collective's tensors then needs the GIL, and the process aborts ("terminate called
    without an active exception", SIGABRT) after a run that saved everything. Seen in CI on a 2-rank FSDP2 run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
