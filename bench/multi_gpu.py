#!/usr/bin/env python
"""Multi-GPU LoRA training through PyTorch distributed (issue 9): DDP scaling and FSDP2 sharding, fasttune only.

Random-initialised Llama shapes (as bench/train_speed.py), LoRA r=16 alpha=16 on all seven projections, AdamW over
the adapters, random token batches (each rank its own: per-device batch x seq tokens), bf16 on CUDA, fp32 on CPU.
Every launch runs `python -m torch.distributed.run --standalone --nproc_per_node=N` on this same file (sequentially,
one launch per N in --gpus) with NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1
(NVLink multicast must stay off on the lent machines) and PYTHONUNBUFFERED=1; on CPU the ranks use gloo.

    scaling  the model fits one GPU: every rank builds the whole model (same seed), memory policy (--policy, "auto"
             by default), DDP via fasttune.train.distributed.wrap (N=1: no wrapper). Per N: tokens/s total and per
             GPU, scaling efficiency = (tokens/s per GPU at N) / (tokens/s at N=1) (issue 9's goal: >= 0.90).
    fsdp     a model too big for one GPU (default the Llama-3.1-70B shape, 141 GB in bf16), built on the meta device,
             sharded with FSDP2 (`wrap(..., "fsdp")`: fully_shard per decoder layer, then the root), and only then
             materialised: `to_empty` allocates this rank's shards, which get seeded N(0, 0.02) (norms 1, LoRA A
             uniform(+-1/sqrt(in)), B 0), so no rank ever holds the whole bf16 model. The memory policy ("auto" by
             default) is applied after materialisation; checkpointed layers of an FSDP2 model go through PyTorch's
             non-reentrant checkpoint (train/memory.py), and "offload" checkpoints without offloading there. ("auto"
             plans with the free memory less two unsharded layers, FSDP2's all-gather and prefetch buffers.) 70B at
             seq 2048 x 1 keeps about 38 GB of activations (80 layers, by train/memory.py's estimate) next to 70 GB
             of shards on 2 GPUs.
             --qlora: every decoder linear becomes an NF4Linear (built on meta, its codes filled after `to_empty` by
             quantising a seeded random bf16 weight on the device, one layer at a time). NOTE: fasttune's NF4 codes
             and scales are buffers, which fully_shard does not shard: they are REPLICATED on every rank (about
             35 GB at 70B); QLoRA + FSDP2 shards only the adapters, embeddings, norms and LM head. The JSON states
             this per row ("note", "replicated_buffer_gib").

step time = median over --steps timed optimizer steps after --warmup steps, synchronised, max over ranks;
tokens/s = world size x batch x seq / step time; peak = torch.cuda.max_memory_allocated() from just before the
first step (weights included), max over ranks (all_reduce MAX), per-rank values listed too. On CPU peak is 0 and
peak_rss_gib (process high-water mark) is given instead. Losses: the mean over ranks, per step. adapters_updated:
some lora_B (initialised to 0) is non-zero after the first step, i.e. the adapters really received gradients.

    python bench/multi_gpu.py scaling --gpus 1,2 --out $OUT/multi_gpu_scaling.json          # 8B, seq 2048 x 2
    python bench/multi_gpu.py scaling --gpus 1,2,4 --case 8b --seq 2048 --batch 2 --steps 8 --warmup 3
    python bench/multi_gpu.py fsdp --gpus 2 --case 70b --out $OUT/multi_gpu_fsdp.json       # 70B, seq 2048 x 1
    python bench/multi_gpu.py fsdp --gpus 2 --case 70b --qlora --steps 3
    python bench/multi_gpu.py scaling --gpus 1,2 --tiny --device cpu --steps 2 --warmup 1   # CPU smoke test (gloo)
    python bench/multi_gpu.py fsdp --gpus 2 --tiny --device cpu --steps 2

To run on nvidia-h200-x2 (one device call, timeout_s 600, no carry: the image's python3 has torch and triton, and
this script puts src/ on sys.path; the script sets the multicast variables itself, exported here as well):

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1;
    nvidia-smi -L; python3 bench/multi_gpu.py scaling --gpus 1,2 --launch-timeout 150 \
        --out $OUT/multi_gpu_scaling.json 2>&1 | tee $OUT/scaling.log;
    python3 bench/multi_gpu.py fsdp --gpus 2 --case 70b --launch-timeout 280 \
        --out $OUT/multi_gpu_fsdp.json 2>&1 | tee $OUT/fsdp.log

On nvidia-h200-x4 the same with `scaling --gpus 1,2,4` and `fsdp --gpus 4 --case 70b`. Optional second call:
`fsdp --gpus 2 --case 70b --qlora` (35 GB of NF4 codes per rank plus a quantisation pass over 560 layers).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

# NVLink multicast off (the lent machines require it), also for every process this file starts
LAUNCH_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
              "PYTHONUNBUFFERED": "1"}
os.environ.update(LAUNCH_ENV)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))  # bench/ (no script here is named like a package it would shadow)

import train_speed as ts  # noqa: E402  llama_config, build_fasttune, default_dtype, versions, SHAPES, TARGETS

GiB = 2**30
SHAPES = {
    **ts.SHAPES,
    # Llama-3.1-70B: 70.6e9 parameters, 141 GB of bf16 weights: more than one H200 (about 139 GiB usable) holds
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
CASES = {  # name: (shape, seq, per-device batch)
    "1b": ("1b", 2048, 4),
    "8b": ("8b", 2048, 2),
    "70b": ("70b", 2048, 1),
}
DEFAULTS = {  # mode: (case, steps, warmup, memory policy)
    "scaling": ("8b", 8, 3, "auto"),
    "fsdp": ("70b", 3, 1, "auto"),
}
# Under FSDP2 fasttune's own layer checkpointing gave the adapters no gradient (found with this script on CPU);
# train/memory.py now checkpoints FSDP2 layers through PyTorch's checkpoint, and worker() still checks that the
# adapters were updated.
QLORA_FSDP_NOTE = ("QLoRA + FSDP2: fasttune's NF4 codes and scales are buffers, which fully_shard leaves whole: they "
                   "are replicated on every rank (about 35 GB at 70B); only the adapters, embeddings, norms and LM "
                   "head are sharded")


def llama_config(shape: str, vocab: int) -> dict:
    cfg = ts.llama_config("8b", vocab)  # the common Llama fields
    cfg.update(SHAPES[shape])
    return cfg


def resolve(args) -> tuple[str, int, int, int]:
    """(shape, seq, per-device batch, vocab) of this run."""
    shape, seq, batch = CASES[args.case]
    if args.tiny:
        shape, seq = "tiny", 64
    return shape, args.seq or seq, args.batch or batch, 512 if args.tiny else args.vocab


# ---- worker (one rank under torchrun) -----------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather(values: list[float], info, device) -> list[list[float]]:
    """Every rank's `values` (a collective: all ranks call it with the same length)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not info.enabled:
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return [x.tolist() for x in out]


def reduce_max(x: float, info, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def build_sharded(cfg: dict, device, dtype, qlora: bool, info, seed: int = 0):
    """The fasttune model of `cfg` built on the meta device, LoRA added, FSDP2-sharded (when world size > 1), then
    materialised shard by shard on `device`. Returns (model, engine, facts)."""
    from fasttune.kernels.nf4 import quantize_nf4
    from fasttune.adapters import LoraLinear, add_lora
    from fasttune.models.nf4_linear import NF4Linear
    from fasttune.models import ArchSpec, CausalLM
    from fasttune.models.decoder import RMSNorm
    from fasttune.train import distributed as dist_utils

    spec = ArchSpec.from_hf_config(cfg)
    with ts.default_dtype(dtype), torch.device("meta"):
        model = CausalLM(spec)
        if qlora:  # NF4Linear with meta buffers of the right shapes; the codes are filled after to_empty
            for name, module in list(model.named_modules()):
                if isinstance(module, nn.Linear) and name.startswith("model.layers."):
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, NF4Linear(quantize_nf4(module.weight), module.bias))
    model = add_lora(model, r=16, alpha=16, target_modules=ts.TARGETS)  # adapters on meta too (base's device)
    model.train()
    engine = dist_utils.wrap(model, info, "fsdp")  # fully_shard per layer + root; no-op for one process
    model.to_empty(device=device)  # allocates this rank's shards only (and whole replicated buffers)

    gen = torch.Generator(device=device).manual_seed(seed + 7919 * info.rank)  # shards differ between ranks
    n_nf4 = 0
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                t = local_tensor(p)
                if t.numel() == 0:
                    continue
                if isinstance(module, LoraLinear):
                    if name == "lora_A":
                        bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform(a=sqrt(5)), as PEFT
                        t.uniform_(-bound, bound, generator=gen)
                    else:
                        t.zero_()
                elif p.dim() >= 2:
                    t.normal_(0, 0.02, generator=gen)
                elif isinstance(module, RMSNorm):
                    t.fill_(0.0 if module.unit_offset else 1.0)
                else:
                    t.zero_()
            if isinstance(module, NF4Linear):
                # replicated buffers: the same weight on every rank (seeded by the layer's index, not the rank)
                g = torch.Generator(device=device).manual_seed(seed + 1 + n_nf4)
                w = torch.empty(module.out_features, module.in_features, dtype=module.weight_dtype, device=device)
                w.normal_(0, 0.02, generator=g)
                q = quantize_nf4(w)
                del w
                module.packed.copy_(q.packed)
                module.absmax_q.copy_(q.absmax_q)
                module.absmax2_bits.copy_(q.absmax2.float().contiguous().view(torch.int32))
                module.offset_bits.copy_(q.offset.float().reshape(1).view(torch.int32))
                del q
                n_nf4 += 1
            else:
                for bname, _ in module.named_buffers(recurse=False):
                    raise RuntimeError(f"build_sharded: no initialiser for buffer {mod_name}.{bname}")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if local_tensor(t).is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after materialisation: {left[:5]}")

    params = list(model.parameters())
    facts = dict(
        full_param_gib=sum(tensor_bytes(p) for p in params) / GiB,  # p.numel() is the global size for a DTensor
        local_param_gib=sum(tensor_bytes(local_tensor(p)) for p in params) / GiB,
        replicated_buffer_gib=sum(tensor_bytes(b) for b in model.buffers()) / GiB,
        sharded=dist_utils.is_sharded(model),
        nf4_layers=n_nf4,
    )
    sync(device)
    return model, engine, facts


def allgather_reserve_bytes(spec, dtype_bytes: int) -> int:
    """Two unsharded decoder layers (the one computing and the one prefetched) in the compute dtype."""
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = spec.hidden_size * (2 * q + 2 * kv) + 3 * spec.hidden_size * spec.intermediate_size
    return 2 * per_layer * dtype_bytes


def worker(args) -> int:
    from fasttune.adapters import param_groups
    from fasttune.train import distributed as dist_utils
    from fasttune.train.memory import apply_memory_policy, free_device_bytes

    use_cuda = args.device == "cuda"
    info = dist_utils.setup(use_cuda=use_cuda)
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if use_cuda else torch.float32)
    shape, seq, batch, vocab = resolve(args)
    cfg = llama_config(shape, vocab)
    torch.manual_seed(0)
    row = dict(mode=args.mode, case=args.case + ("-qlora" if args.qlora else ""), shape=shape,
               world_size=info.world_size, device=torch.cuda.get_device_name(device) if use_cuda else "cpu",
               seq=seq, batch_per_device=batch, global_batch=batch * info.world_size,
               tokens_per_step=batch * seq * info.world_size, dtype=str(dtype).replace("torch.", ""),
               policy=args.policy, qlora=args.qlora)
    try:
        t_build = time.perf_counter()
        if args.mode == "scaling":
            model, setup = ts.build_fasttune(cfg, device, dtype, args.qlora, args.policy, seq, batch)
            engine = dist_utils.wrap(model, info, "ddp")
            row["parallel"] = "ddp" if info.enabled else "single process"
        else:
            model, engine, facts = build_sharded(cfg, device, dtype, args.qlora, info)
            free = free_device_bytes(device) if args.policy == "auto" else None
            if free is not None and info.enabled:
                free -= allgather_reserve_bytes(model.spec, torch.finfo(dtype).bits // 8)
            plan = apply_memory_policy(model, args.policy, seq_len=seq, batch_size=batch, free_bytes=free)
            setup = plan.summary()
            row["parallel"] = "fsdp2" if info.enabled else "single process"
            row.update(facts)
            row["local_param_gib_max"] = reduce_max(facts["local_param_gib"], info, device)
            if args.qlora:
                row["note"] = QLORA_FSDP_NOTE
        row["setup"] = setup
        row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = torch.optim.AdamW(param_groups(model, lr=1e-4), lr=1e-4)  # after wrap: FSDP2 swaps parameters
        gen = torch.Generator(device=device).manual_seed(1 + info.rank)  # each rank its own batch
        ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
        sync(device)
        row["build_s"] = reduce_max(time.perf_counter() - t_build, info, device)
        dist_utils.barrier(info)
        if use_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            loss = engine(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
            losses.append(float(loss.detach()))
            if i == 0:  # the adapters really train (lora_B starts at 0, so any gradient makes it non-zero)
                moved = max((float(local_tensor(p).detach().abs().max()) for n, p in model.named_parameters()
                             if n.endswith("lora_B") and local_tensor(p).numel()), default=0.0)
                row["adapters_updated"] = reduce_max(moved, info, device) > 0
            if info.rank == 0:
                print(f"  [N={info.world_size}] step {i}: {dt:.3f} s, loss (rank 0) {losses[-1]:.4f}", flush=True)
        step_ranks = [r[0] for r in gather([statistics.median(times)], info, device)]
        peak = torch.cuda.max_memory_allocated(device) / GiB if use_cuda else 0.0
        peak_ranks = [r[0] for r in gather([peak], info, device)]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        loss_ranks = gather(losses, info, device)
        mean_losses = [sum(col) / len(col) for col in zip(*loss_ranks)]
        step_s = max(step_ranks)
        row.update(step_s=step_s, step_s_ranks=step_ranks, tokens_per_s=batch * seq * info.world_size / step_s,
                   tokens_per_s_per_gpu=batch * seq / step_s, peak_gib=max(peak_ranks), peak_gib_ranks=peak_ranks,
                   peak_rss_gib=reduce_max(rss, info, device), losses=mean_losses, first_loss=mean_losses[0],
                   last_loss=mean_losses[-1], finite=all(math.isfinite(x) for x in mean_losses))
    except Exception as e:  # noqa: BLE001 - the row says what failed
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
        print(f"[rank {info.rank}] " + row["traceback"], flush=True)
    if info.rank == 0 and args.result:
        Path(args.result).write_text(json.dumps(row))
    rc = 1 if "error" in row else 0
    if rc == 0:
        dist_utils.barrier(info)
        dist_utils.cleanup()
    dist_utils.exit_worker(rc)  # skips interpreter shutdown, where a gloo worker could abort the process


# ---- driver -------------------------------------------------------------------------------------------------

def launch(args, n: int, result: Path) -> tuple[int, str]:
    """One torchrun launch of N workers; streams their output; returns (exit status, last lines)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), "worker", "--mode", args.mode, "--case", args.case, "--device", args.device,
           "--policy", args.policy, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--result", str(result)]
    cmd += (["--seq", str(args.seq)] if args.seq else []) + (["--batch", str(args.batch)] if args.batch else [])
    cmd += (["--tiny"] if args.tiny else []) + (["--qlora"] if args.qlora else [])
    env = {**os.environ, **LAUNCH_ENV}
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own process group: a timeout ends torchrun and workers
    timed_out = []

    def kill():
        timed_out.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(args.launch_timeout, kill) if args.launch_timeout else None
    if timer:
        timer.start()
    tail = collections.deque(maxlen=40)
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
    if timed_out:
        tail.append(f"killed after --launch-timeout {args.launch_timeout} s\n")
    return rc, "".join(tail)


def add_efficiency(rows: list[dict]) -> None:
    base = next((r for r in rows if r.get("world_size") == 1 and "tokens_per_s" in r), None)
    for r in rows:
        if "tokens_per_s_per_gpu" in r:
            r["scaling_efficiency"] = (r["tokens_per_s_per_gpu"] / base["tokens_per_s"]) if base else None


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | case | GPUs | seq x batch/GPU | tokens/s | tokens/s per GPU | scaling eff. | step s "
             "| peak GiB/rank (max) | loss first→last | memory setup |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        case = r["case"] + (f" ({r['shape']} shape)" if r.get("shape") == "tiny" else "")
        head = f"| {r['mode']} | {case} | {r['world_size']} | {r.get('seq', '')} x {r.get('batch_per_device', '')} "
        if "tokens_per_s" not in r:
            lines.append(head + f"| failed: {r.get('error', '')[:100]} | | | | | | |")
            continue
        eff = f"{r['scaling_efficiency']:.2f}" if r.get("scaling_efficiency") is not None else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else f"(cpu rss {r['peak_rss_gib']:.2f})"
        lines.append(head + f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {eff} | "
                     f"{r['step_s']:.3f} | {peak} | {r['first_loss']:.3f}→{r['last_loss']:.3f} | {r['setup']} |")
    return "\n".join(lines)


def driver(args, argv) -> int:
    gpus = [int(x) for x in args.gpus.split(",") if x.strip()]
    info = ts.versions()
    if torch.cuda.is_available():
        info["gpus_visible"] = torch.cuda.device_count()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    print(json.dumps(info), flush=True)
    out = args.out or (os.path.join(os.environ["OUT"], f"multi_gpu_{args.mode}.json") if os.environ.get("OUT")
                       else None)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), versions=info,
                  command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                  mode=args.mode, env=LAUNCH_ENV, rows=[])
    if args.mode == "fsdp" and args.qlora:
        result["note"] = QLORA_FSDP_NOTE
    t_start = time.perf_counter()
    for n in gpus:
        if args.device == "cuda" and n > torch.cuda.device_count():
            row = dict(mode=args.mode, case=args.case, world_size=n,
                       error=f"{n} GPUs asked for, {torch.cuda.device_count()} visible")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "row.json"
                t0 = time.perf_counter()
                rc, tail = launch(args, n, path)
                row = json.loads(path.read_text()) if path.exists() else dict(mode=args.mode, case=args.case,
                                                                                world_size=n)
                row["launch_s"] = time.perf_counter() - t0
                if rc != 0:  # a complete row stands (a worker may fail after writing it); else it is a failure
                    row["exit_status"] = rc
                    row["output_tail"] = tail
                    if "tokens_per_s" not in row:
                        row.setdefault("error", f"torchrun exit status {rc}")
        result["rows"].append(row)
        add_efficiency(result["rows"])
        result["elapsed_s"] = time.perf_counter() - t_start
        if out:  # after every launch, so a later hang or kill keeps the rows measured so far
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2))
    table = markdown(result["rows"])
    if result.get("note"):
        table += "\n\n" + result["note"]
    print("\n" + table + f"\n\n(total {result['elapsed_s']:.0f} s)", flush=True)
    if out:
        Path(out).with_suffix(".md").write_text(table + "\n")
        print(f"wrote {out}", flush=True)
    return 0 if all("error" not in r for r in result["rows"]) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode in ("scaling", "fsdp", "worker"):
        p = sub.add_parser(mode, help={"scaling": "DDP tokens/s for each N in --gpus",
                                       "fsdp": "FSDP2-sharded training of a model too big for one GPU",
                                       "worker": "(internal) one rank under torchrun"}[mode])
        case, steps, warmup, policy = DEFAULTS.get(mode, (None, None, None, "auto"))
        if mode == "worker":
            p.add_argument("--mode", dest="worker_mode", choices=["scaling", "fsdp"], required=True)
            p.add_argument("--result", default=None, help="rank 0 writes its JSON row here")
        else:
            p.add_argument("--gpus", default="1,2" if mode == "scaling" else "2",
                           help="comma list of process counts, one torchrun launch each")
            p.add_argument("--out", default=None, help=f"JSON path (default: $OUT/multi_gpu_{mode}.json when $OUT "
                                                       "is set); the markdown table goes next to it (.md)")
            p.add_argument("--launch-timeout", type=float, default=None,
                           help="seconds before one launch is killed (its row then records the failure)")
        p.add_argument("--case", default=case, choices=list(CASES))
        p.add_argument("--seq", type=int, default=None, help="override the case's sequence length")
        p.add_argument("--batch", type=int, default=None, help="override the case's per-device batch")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--warmup", type=int, default=warmup)
        p.add_argument("--policy", default=policy, help="fasttune memory policy: auto, none, recompute-mlp, "
                                                        f"checkpoint, offload (default {policy})")
        p.add_argument("--qlora", action="store_true", help="NF4 base (see the docstring for fsdp)")
        p.add_argument("--vocab", type=int, default=128256)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
        p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                       help="base weight dtype (auto: bf16 on CUDA, fp32 on CPU)")
        p.add_argument("--tiny", action="store_true", help="tiny shape, seq 64, vocab 512 (implied by --device cpu)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        args.tiny = True
    if args.mode == "worker":
        args.mode = args.worker_mode
        return worker(args)
    if args.case is None or args.steps is None:
        ap.error("--case, --steps and --warmup are required")
    return driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
