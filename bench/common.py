"""What every benchmark here shares: synchronising and freeing the GPU, timing, the random weights of real shapes,
the versions recorded beside each result. One home, imported by the scripts (they run from this folder's parent
as `python bench/<script>.py`, which puts this folder on sys.path)."""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn

GiB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_everything(device: torch.device) -> None:
    """Collect Python garbage and hand cached CUDA blocks back, so the next measurement starts from what it owns."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def median_cuda_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() by CUDA events, after `warmup` untimed calls (autotuning, compilation)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed_training(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int) -> dict:
    """Run warmup + steps optimizer steps (`step` returns the loss); the median wall time of the timed ones
    (synchronised), every loss, and the peak memory from the first step (weights included)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return dict(step_s=statistics.median(times), peak_gib=peak / GiB, first_loss=losses[0], last_loss=losses[-1],
                finite=all(math.isfinite(x) for x in losses))


def profile_step(step: Callable[[], object], device: torch.device, top: int = 15,
                 totals: dict | None = None) -> list[dict]:
    """One more call of `step` under torch.profiler: the `top` device kernels by total time (name, calls, ms), so a
    result row says where its step time goes. `totals` (CUDA), when given, gets the step's wall ms under the
    profiler, the summed duration of every GPU activity (kernels, copies, memsets) and their count: a device sum
    well below the wall time means the step waits on the host (launches, Python), not on its kernels."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    if totals is not None and device.type == "cuda":
        gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        totals.update(wall_ms=wall_ms, device_ms=sum(e.time_range.elapsed_us() for e in gpu) / 1e3,
                      device_activities=len(gpu))
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"name": e.key[:90], "calls": e.count, "ms": getattr(e, key) / 1e3} for e in events[:top]]


def device_activity_counts(step: Callable[[], object], device: torch.device) -> dict[str, int]:
    """One more call of `step` under torch.profiler (CUDA only): how many times each GPU activity ran (kernels,
    copies, memsets, by name). Two calls that differ by one unit of work (one decode step) differ by its launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    counts: dict[str, int] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def materialize_random_(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0,
                        after_module: Callable[[str, nn.Module], None] | None = None) -> None:
    """Give a model built on the meta device real, frozen tensors of `dtype`, parameter by parameter: matrices
    N(0, 0.02), RMSNorm weights at their identity (1, or 0 for the (1 + w) kind), other vectors (biases, sinks)
    zero. `after_module(name, module)` runs once a module's own parameters exist (QLoRA quantises there), so a
    large model's 16-bit weights never all coexist. On the meta device the tensors get `dtype` and no values (the
    layout, for memory accounting)."""
    from fasttune.models.decoder import RMSNorm

    meta = device.type == "meta"
    gen = None if meta else torch.Generator(device=device).manual_seed(seed)
    for mod_name in [n for n, _ in model.named_modules()]:  # names, not modules: after_module may replace one
        module = model.get_submodule(mod_name)
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if meta:
                pass
            elif p.dim() >= 2:
                t.normal_(0, 0.02, generator=gen)
            elif isinstance(module, RMSNorm):
                t.fill_(0.0 if module.unit_offset else 1.0)
            else:
                t.zero_()
            setattr(module, name, nn.Parameter(t, requires_grad=False))
        if after_module is not None:
            after_module(mod_name, module)


def make_optimizer(model: nn.Module, tool: str, optimizer: str | None = None) -> torch.optim.Optimizer:
    """AdamW at lr 1e-4 over what trains: fasttune's own parameter groups, or every trainable parameter.
    `optimizer` (fasttune rows): the trainer's `train.optimizer`, "adamw" (torch's, fused on CUDA) or "adamw8bit",
    made as the trainer makes it (train.optimizers.make_optimizer); None: torch's AdamW with its defaults."""
    if tool == "fasttune":
        from fasttune.adapters import param_groups

        groups = param_groups(model, lr=1e-4)
        if optimizer is None:
            return torch.optim.AdamW(groups, lr=1e-4)
        from fasttune.train.optimizers import make_optimizer as make_fasttune_optimizer

        return make_fasttune_optimizer(groups, optimizer, lr=1e-4, device=next(model.parameters()).device)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def train_step(model: nn.Module, tool: str, ids: torch.Tensor, opt: torch.optim.Optimizer | None) -> torch.Tensor:
    """Forward with labels = ids, backward, and the optimizer step when there is one; the detached loss."""
    loss = model(ids, labels=ids).loss if tool == "fasttune" else model(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("transformers", "peft", "triton", "liger_kernel", "bitsandbytes"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional
            out[mod] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
