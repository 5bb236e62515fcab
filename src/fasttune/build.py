"""Model assembly, outside the training loop: one place that loads, quantises, adds adapters, chooses what trains
and plans memory.

    model = build_model(cfg.model, cfg.lora, "auto", batch_rows=4)      # what a run trains (the Trainer, benchmarks)
    model, tokenizer = load_trained("runs/x/adapter")                   # what chat, generate and export use

Also where a model comes from (the bundled "tiny", a folder, a GGUF file, a Hub id) and what a folder of trained
weights records (`adapter_meta`: a run's adapter/, a checkpoint, a PEFT adapter).
"""
from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path

import torch

from .adapters.config import LoraConfig
from .adapters.files import PEFT_CONFIG, PEFT_WEIGHTS, RUN_RECORD, TRAINED_WEIGHTS
from .models.decoder import CausalLM


def build_model(model_cfg, lora_cfg: LoraConfig, memory_policy: str = "none", *, batch_rows: int = 1,
                train_embeddings: bool = False, device: str | torch.device | None = None, dist=None,
                parallel: str = "ddp", optimizer: str | None = None) -> CausalLM:
    """The model a run trains, from the config's `model:` (train.config.ModelConfig) and `lora:` sections: loaded
    (the base resolved, pickle-only folders refused unless allowed; under torchrun with `parallel` "fsdp", straight
    into FSDP2 shards), quantised (model.load_in_4bit / keep_quantized), adapters added (lora.enabled), trainable
    parameters chosen (adapters, or every weight for a full fine-tune; `train_embeddings`) and the memory policy
    planned for `batch_rows` rows of model.max_seq_length tokens (and, with `optimizer`, the gradients and
    moments training will add). `device`: model.device when None; `dist`: the train.distributed.DistInfo of this
    process (None: one process). In train mode."""
    if device is None:
        want = model_cfg.device
        device = "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
    device = torch.device(device)
    dtype = model_cfg.dtype
    if dtype == "auto":  # one rule with fasttune.load and the CLI
        from . import auto_dtype

        dtype = auto_dtype(device)
    path = resolve_model_path(model_cfg.path)
    if not model_cfg.allow_pickle:
        refuse_pickle_only(Path(path), "set model.allow_pickle: true (--set model.allow_pickle=true)")
    from .models.checkpoint import is_prequantized

    if (dist is not None and dist.enabled and parallel == "fsdp" and not model_cfg.load_in_4bit
            and not is_prequantized(path)):  # a 4-bit base (quantised here or stored so) is loaded whole
        # straight into FSDP2 shards: no rank ever holds the whole model (it may not fit one device)
        from .train.config import ConfigError
        from .train.distributed import load_into_shards

        try:
            model = load_into_shards(path, dist, device, dtype, lora=lora_cfg if lora_cfg.enabled else None)
        except ValueError as e:  # a LoRA setting this model cannot take: a config error, as in one process
            raise ConfigError(f"lora: {e}") from None
        model.set_max_seq_length(model_cfg.max_seq_length)
    else:
        model = load_base(path, max_seq_length=model_cfg.max_seq_length, dtype=dtype, device=device,
                          load_in_4bit=model_cfg.load_in_4bit, keep_quantized=model_cfg.keep_quantized,
                          allow_pickle=model_cfg.allow_pickle)
    return prepare_for_training(model, lora_cfg, memory_policy, seq_len=model_cfg.max_seq_length,
                                batch_rows=batch_rows, train_embeddings=train_embeddings, optimizer=optimizer)


def load_base(path: str | os.PathLike, max_seq_length: int = 4096, dtype=None, device=None,
              load_in_4bit: bool = False, keep_quantized: bool = False, allow_pickle: bool = False) -> CausalLM:
    """The base model of a resolved folder or GGUF file: `load_in_4bit` quantises every decoder linear (and an MoE
    model's expert stacks; not its routers) to NF4 as it is read (QLoRA), `keep_quantized` keeps a GGUF file's blocks. What `fasttune.load` returns beside the tokenizer."""
    from .models.checkpoint import load_model

    quantize = None
    if load_in_4bit:
        from .models.nf4_linear import quantize_linear as quantize
    model = load_model(path, dtype=dtype, device=device, allow_pickle=allow_pickle, quantize=quantize,
                       keep_quantized=keep_quantized)
    model.set_max_seq_length(max_seq_length)
    return model


def prepare_for_training(model: CausalLM, lora_cfg: LoraConfig, memory_policy: str = "none", *,
                         seq_len: int | None = None, batch_rows: int = 1, train_embeddings: bool = False,
                         optimizer: str | None = None) -> CausalLM:
    """A loaded model made ready to train (in place): the configured adapters added unless it has some, the
    trainable parameters chosen (the adapters; every weight when lora.enabled is false; the embeddings / output
    layer with `train_embeddings`), and the memory policy installed for `batch_rows` x `seq_len` tokens. With
    `optimizer` (train.optimizer), "auto" plans for the memory left once the gradients and that optimizer's
    moments exist (they are made after the plan)."""
    from .adapters import LoraLinear, attach_lora, lora_parameters

    if lora_cfg.enabled and not lora_parameters(model):  # (an MoE model's expert adapters count too)
        from .train.config import ConfigError

        try:
            model = attach_lora(model, lora_cfg)
        except ValueError as e:  # a setting this model cannot take (e.g. LoRA on a tied lm_head): a config error
            raise ConfigError(f"lora: {e}") from None
    model.requires_grad_(not lora_cfg.enabled)
    for p in lora_parameters(model) if lora_cfg.enabled else ():
        p.requires_grad_(True)
    if train_embeddings:
        model.model.embed_tokens.weight.requires_grad_(True)
        if not isinstance(model.lm_head, LoraLinear):  # a LoRA'd head is adapted, its base stays frozen
            model.lm_head.weight.requires_grad_(True)
    from .train.memory import apply_memory_policy
    from .train.optimizers import training_state_bytes

    pending = training_state_bytes(model, optimizer) if optimizer is not None and memory_policy == "auto" else 0
    apply_memory_policy(model, policy=memory_policy, seq_len=seq_len, batch_size=batch_rows,  # "none": the defaults
                        pending_bytes=pending)
    return model.train()


def tiny_model_path() -> str:
    return str(resources.files("fasttune") / "assets" / "tiny")



def resolve_model_path(path: str) -> str:
    """"tiny" (the bundled model), a local folder or file, or a Hub repo id (the HF cache, else a download)."""
    from .models.checkpoint import resolve_pretrained

    return tiny_model_path() if path == "tiny" else str(resolve_pretrained(path))



def recorded_model_path(path: str) -> str:
    """model.path as an adapter or checkpoint should record it: "tiny" stays a name, a local folder becomes absolute
    (a relative path means the current directory, which a later `chat` or `export` need not share)."""
    if path == "tiny" or not Path(path).exists():
        return path
    return str(Path(path).resolve())



def base_model_dir(path: str, what: str, allow_pickle: bool = False) -> Path:
    """The model folder `path` names ("tiny" included), checked before minutes go into loading; `what` says where
    the path came from, for the error. Raises CheckpointError saying what to do."""
    from .models.checkpoint import CheckpointError

    folder = Path(resolve_model_path(path))
    if folder.suffix == ".gguf":  # a GGUF file is a whole model (fasttune.load reads it)
        if not folder.is_file():
            raise CheckpointError(f"the base model {path} ({what}) does not exist: pass the GGUF file or the base "
                                  "model's folder with --model")
        return folder
    if not (folder / "config.json").is_file():
        state = "is not a model folder (no config.json)" if folder.is_dir() else "does not exist"
        raise CheckpointError(f"the base model {path} ({what}) {state}: pass the base model's folder with --model "
                              "(for export: as MODEL_DIR)")
    if not allow_pickle:
        refuse_pickle_only(folder, "pass --allow-pickle (allow_pickle=True)")
    return folder



def refuse_pickle_only(folder: Path, how: str) -> None:
    """Raise CheckpointError when `folder` holds its weights only as pickle files; `how` says how to allow them
    where the user is (a CLI flag, a config key), checked before minutes go into loading."""
    from .models.checkpoint import CheckpointError

    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles:
        raise CheckpointError(f"{folder} holds only pickle weights ({pickles[0].name}), which can run code when "
                              "loaded: convert them to safetensors (transformers: from_pretrained, then "
                              f"save_pretrained), or {how} if you trust the file")



def _checkpoint_base(cfg: dict, checkpoint: Path) -> str:
    """A checkpoint records model.path as configured; a relative one meant the training run's working directory,
    which the run folder's own relative train.output_dir locates (<cwd>/<output_dir>/checkpoints/step-N)."""
    model_path, output_dir = cfg["model"]["path"], Path(cfg["train"]["output_dir"])
    if model_path == "tiny" or Path(model_path).is_absolute() or Path(model_path).exists():
        return model_path
    run_dir = checkpoint.resolve().parent.parent
    if not output_dir.is_absolute() and run_dir.parts[-len(output_dir.parts):] == output_dir.parts:
        then = Path(*run_dir.parts[: -len(output_dir.parts)]) / model_path
        if then.exists():
            return str(then)
    return model_path



def adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    """What a folder of trained weights records, whatever its kind, as one dict: `kind`, `weights` (file),
    `base_model`, `lora` (the run's lora section; None for a PEFT adapter), `objective`, `chat_template`,
    `system_prompt`, `step`. The kinds:
        run         a run's adapter/: fasttune_adapter.json + trainable.safetensors (every trained tensor)
        checkpoint  a run's checkpoints/step-N: trainer_state.json (the run's config) + trainable.safetensors
        peft        adapter_config.json + adapter_model.safetensors: fasttune's `export --format adapter`, PEFT,
                    Unsloth, ...
    A folder holding both a run's and PEFT's files is read as the run's (it has everything the run trained).
    Raises AdapterError naming what to pass instead."""
    from .adapters.peft import AdapterError
    from .train import checkpoint as ckpt

    folder = Path(adapter_dir)
    kinds = "a run's adapter/ folder, a run's checkpoints/step-N folder or a PEFT adapter folder"
    if not folder.is_dir():
        raise AdapterError(f"--adapter {folder} does not exist: pass {kinds}")
    if (folder / RUN_RECORD).is_file():
        meta = json.loads((folder / RUN_RECORD).read_text())
        return {"objective": "sft", "chat_template": None, "system_prompt": None, "step": None, **meta,
                "kind": "run", "weights": str(folder / TRAINED_WEIGHTS)}
    if (folder / "trainer_state.json").is_file():
        if ckpt.is_sharded_checkpoint(folder):
            raise AdapterError(f"{folder} is a sharded (FSDP2) checkpoint, split across ranks' files: use the run's "
                               "adapter/ folder, or finish the run with `fasttune train CONFIG --resume`, which "
                               "writes one")
        state = json.loads((folder / "trainer_state.json").read_text())
        cfg = state.get("config") or {}
        if not cfg or not (folder / TRAINED_WEIGHTS).is_file():
            raise AdapterError(f"{folder} is a checkpoint without its config or {TRAINED_WEIGHTS} (written by an "
                               "older fasttune?): use the run's adapter/ folder")
        data = cfg.get("data") or {}
        return {"kind": "checkpoint", "weights": str(folder / TRAINED_WEIGHTS),
                "base_model": _checkpoint_base(cfg, folder), "lora": cfg["lora"],
                "objective": cfg["objective"]["type"], "train_embeddings": cfg.get("train_embeddings", False),
                "max_seq_length": cfg["model"].get("max_seq_length"), "step": state.get("step"),
                "chat_template": data.get("chat_template"), "system_prompt": data.get("system_prompt")}
    if (folder / PEFT_CONFIG).is_file():
        cfg = json.loads((folder / PEFT_CONFIG).read_text())
        return {"kind": "peft", "weights": str(folder / PEFT_WEIGHTS), "base_model": cfg.get("base_model_name_or_path"),
                "lora": None, "objective": "reward" if cfg.get("task_type") == "SEQ_CLS" else "sft",
                "chat_template": None, "system_prompt": None, "step": None}
    if (folder / "adapter").is_dir() or (folder / "checkpoints").is_dir():
        raise AdapterError(f"{folder} is a training run's folder, not an adapter: pass {folder / 'adapter'} (the "
                           f"final weights) or {folder / 'checkpoints'}/step-N")
    raise AdapterError(f"{folder} holds no adapter (no {RUN_RECORD}, trainer_state.json or {PEFT_CONFIG}): pass "
                       f"{kinds}")



def load_trained(adapter_dir: str | os.PathLike, base: str | None = None, device=None, dtype=None,
                 load_in_4bit: bool = False, allow_pickle: bool = False):
    """(model, tokenizer): the base model with everything a folder of trained weights holds (any kind that
    `adapter_meta` reads; its record names the base unless `base` is given): LoRA adapters, trained embeddings /
    LM head (recorded on `model.lora_config`, so a PEFT export carries them as modules_to_save), a full
    fine-tune's weights, and a reward model's head as `model.score`. Frozen, in eval mode."""
    from . import load
    from .adapters.peft import AdapterError, load_adapter

    adapter_dir = Path(adapter_dir)
    meta = adapter_meta(adapter_dir)
    if base is None and not meta["base_model"]:
        raise AdapterError(f"{adapter_dir} does not name its base model: pass it with --model (export: MODEL_DIR)")
    folder = base_model_dir(base or meta["base_model"], "given" if base else f"recorded in {adapter_dir}",
                            allow_pickle)
    model, tokenizer = load(folder, dtype=dtype, device=device, load_in_4bit=load_in_4bit, allow_pickle=allow_pickle)
    if meta["kind"] == "peft":
        return load_adapter(model, adapter_dir).requires_grad_(False).eval(), tokenizer

    from safetensors.torch import load_file

    state = load_file(meta["weights"])
    lc = meta["lora"]
    if lc["enabled"]:
        from .adapters import attach_lora

        embed = "model.model.embed_tokens.weight" in state
        head = "model.lm_head.weight" in state and not model.spec.tie_word_embeddings
        settings = {f.name: lc[f.name] for f in dataclasses.fields(LoraConfig) if f.name in lc}
        model = attach_lora(model, LoraConfig(**{**settings, "dropout": 0.0}), train_embeddings=embed,
                            train_lm_head=head)
    elif load_in_4bit:
        raise AdapterError(f"{adapter_dir} holds a full fine-tune (every weight trained): load it without 4-bit")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            prefix, _, name = key.partition(".")
            if key == "reward_head.score.weight":
                model.attach_score(value)
                continue
            if prefix != "model" or name not in params:
                raise AdapterError(f"{adapter_dir}: tensor {key} does not exist in the base model + adapters (was "
                                   "it trained on another base? pass that one with --model)")
            if tuple(params[name].shape) != tuple(value.shape):
                raise AdapterError(f"{adapter_dir}: tensor {key} has shape {tuple(value.shape)}, the base model + "
                                   f"adapters have {tuple(params[name].shape)} (trained on another base? pass that "
                                   "one with --model)")
            params[name].copy_(value.to(params[name].dtype))
    return model.requires_grad_(False).eval(), tokenizer
