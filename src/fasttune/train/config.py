"""The training configuration: nested dataclasses, read from YAML (or a dict) and validated field by field.

    cfg = TrainConfig.from_yaml("configs/sft_tiny.yaml", overrides=["train.max_steps=20"])
    cfg = TrainConfig.from_dict({"model": {"path": "tiny"}, "data": {"path": "bundled:instructions"}})

Unknown keys and wrong types are `ConfigError`s naming the key path (`train.lr`) and what is allowed. Everything
here is plain Python: build a `TrainConfig(...)` directly and pass it to `fasttune.train.train`.

A config file is untrusted input: numbers must be finite and in range, a key may appear once per mapping (YAML would
silently keep the last), a file may use few aliases and expand to a bounded size (a "billion laughs" document is
refused, not expanded), and values quoted in messages are cut short.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ..adapters.config import LoraConfig, normalize_targets


class ConfigError(ValueError):
    pass


MAX_CONFIG_BYTES = 1 << 20  # a training config is a few KB
MAX_ALIASES = 50  # YAML aliases (*name) in one document; configs need few or none
MAX_NODES = 100_000  # nodes of the document with every alias expanded


def _short(value, limit: int = 80) -> str:
    """repr(value) for an error message, bounded in time and length (reprlib stops early in nested values)."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 6, 6
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class ModelConfig:
    path: str = "tiny"  # a Hugging Face model folder, or "tiny" for the model shipped with fasttune
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # QLoRA: NF4 base weights (CUDA)
    keep_quantized: bool = False  # a GGUF model.path: decoder linears keep the file's blocks (LoRA over Q4_K, Q8_0...)
    max_seq_length: int = 512  # longest example in tokens (>= 1); a packed row is exactly this long
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    allow_pickle: bool = False  # load a base stored only as pytorch_model*.bin (pickle can run code: trusted files)


@dataclass
class DataConfig:
    path: str = "bundled:instructions"  # a file/folder, or bundled:instructions | bundled:conversations | bundled:corpus | bundled:preferences
    format: Optional[Literal["jsonl", "json", "csv", "tsv", "parquet", "xlsx", "text"]] = None  # None: from the extension
    kind: Literal["auto", "instruction", "chat", "text", "preference"] = "auto"  # auto: from the columns
    prompt_template: Optional[str] = None  # e.g. "{instruction}[[\nInput: {input}]]" (columns merged into one prompt)
    response_template: Optional[str] = None  # e.g. "{answer}"; None: the output column
    system_prompt: Optional[str] = None  # a system turn before every chat-formatted example
    chat_template: Optional[str] = None  # registry name (chatml, llama-3, ...) or None: the tokenizer's own
    train_on: Literal["responses", "all"] = "responses"  # loss on the response tokens only, or on every token
    packing: bool = True  # padding-free packing (SFT / pre-training); false: padded batches
    eval_fraction: float = 0.05  # share of the examples held out for evaluation, in [0, 1)
    max_examples: Optional[int] = None  # read at most this many rows
    shuffle: bool = True  # shuffle the examples (seeded by train.seed)
    overlong: Literal["truncate", "drop"] = "truncate"  # examples longer than model.max_seq_length
    on_error: Literal["raise", "skip"] = "raise"  # skip: bad rows are counted and reported, not trained on
    # tokenise pass by pass instead of holding the dataset (files larger than memory; sft/pretrain, needs
    # train.max_steps; the eval split, eval_fraction of the rows, is held)
    streaming: bool = False
    shuffle_buffer: int = 10_000  # streaming: examples are shuffled within a window of this many
    max_line_bytes: int = 64 * 2**20  # longest row read (a line, a JSON array element); longer: a data error
    max_field_chars: int = 16 * 2**20  # longest value in a row (a string, a CSV field, a cell); longer: a data error
    encoding: str = "utf-8"  # text encoding of jsonl/json/csv/tsv/text files: any Python codec (cp1252, latin-1...)


@dataclass
class GrpoSection:
    # reward functions, summed with reward_weights: exact_answer (the answer after the completion's last #### or in
    # its last \boxed{} equals the row's answer_column), format (format_regex found in the completion), length
    # (see length_target), or "file.py:function" / "package.module:function" called as function(prompt,
    # completion, row) -> float. A relative file is looked up next to the config file, then in the working
    # directory. User reward functions are the user's Python code, run in the training process as the config asks
    rewards: list[str] = field(default_factory=list)
    reward_weights: Optional[list[float]] = None  # one weight per reward; null: 1 each
    num_generations: int = 8  # G: completions sampled per prompt (>= 2; advantages compare them within the group)
    max_prompt_length: int = 512  # prompt tokens kept (longer prompts keep their last tokens, or data.overlong: drop)
    max_new_tokens: int = 256  # longest completion in tokens (>= 1); dr_grpo's constant normaliser
    temperature: float = 1.0  # sampling temperature (> 0); the log-probabilities are those of the same distribution
    top_p: float = 1.0  # nucleus sampling, in (0, 1]
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    min_p: float = 0.0  # drop tokens below min_p x the top probability, in [0, 1) (0: off)
    # grpo: per-sequence length normalisation, std-normalised advantages; dr_grpo: no length or std normalisation
    # (constant normaliser max_new_tokens); gspo: sequence-level importance ratio exp(mean token log-ratio)
    loss: Literal["grpo", "dr_grpo", "gspo"] = "grpo"
    epsilon_low: float = 0.2  # the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high] (GSPO's paper: 3e-4, 4e-4)
    epsilon_high: float = 0.2  # upper clip (DAPO's clip-higher uses e.g. 0.28)
    # KL(policy || reference) coefficient, k3 estimator; the reference is the model with its adapters off (needs
    # lora.enabled). 0 skips the reference pass
    beta: float = 0.0
    num_iterations: int = 1  # mu: optimizer steps on each rollout (>= 1); > 1 computes the rollout policy's log-probs
    prompt_format: Literal["chat", "raw"] = "chat"  # chat: prompts through the chat template; raw: the text as is
    answer_column: str = "answer"  # the column the exact_answer reward compares with
    format_regex: Optional[str] = None  # the format reward's pattern (re.search, DOTALL), e.g. "<think>.*</think>"
    length_target: Optional[int] = None  # the length reward's target, in characters of the completion
    length_mode: Literal["target", "penalty"] = "target"  # target: -|n - T| / T; penalty: -max(0, n - T) / T
    samples_every: int = 10  # steps between sample completions written to samples.jsonl in the run folder (0: never)
    # sequences decoded at once, the KV cache's rows (>= num_generations); null: train.batch_size x num_generations
    generation_batch_size: Optional[int] = None
    # keep the generation KV cache between rollouts (faster; the memory policy reserves it, with the generator's
    # concatenated q/k/v and gate/up weight copies)
    keep_kv_cache: bool = False
    # merge the (frozen during the rollout) adapters into the dense base weights for generation, restored exactly
    # after: faster decoding for one copy of the adapted weights in host memory (q/k/v and gate/up merge into the
    # generator's concatenated copies instead, with no host copy); a quantised base runs unmerged
    merge_lora: bool = True


@dataclass
class ObjectiveConfig:
    # sft: supervised fine-tuning; pretrain: continued pre-training on text; reward: a reward model (scalar head);
    # dpo / orpo / simpo: preference optimisation on chosen/rejected pairs; kto: unpaired desirable/undesirable
    # examples; grpo: online RL with reward functions (see objective.grpo)
    type: Literal["sft", "pretrain", "reward", "dpo", "orpo", "simpo", "kto", "grpo"] = "sft"
    # DPO / KTO temperature; ORPO: weight of the odds-ratio term (lambda in the paper); SimPO: reward scale (the
    # paper uses 2 to 10)
    beta: float = 0.1
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma (>= 0), in reward units: -log sigmoid(beta d - gamma)
    kto_desirable_weight: float = 1.0  # KTO's lambda_D: weight of desirable examples' loss (> 0)
    kto_undesirable_weight: float = 1.0  # KTO's lambda_U: weight of undesirable examples' loss (> 0)
    train_embeddings: Optional[bool] = None  # None: true for pretrain, false otherwise
    embedding_lr_ratio: float = 0.1  # learning rate of embeddings / LM head relative to train.lr
    label_smoothing: float = 0.0  # sft / pretrain: as F.cross_entropy's (0 = none), inside the fused loss
    grpo: GrpoSection = field(default_factory=GrpoSection)  # rollouts, rewards and the loss of objective.type grpo


@dataclass
class TrainSection:
    output_dir: str = "runs/fasttune"  # the run folder: config.yaml, metrics.jsonl, checkpoints/, adapter/
    seed: int = 0  # seed of the data order, the eval split and dropout
    batch_size: int = 4  # micro-batch rows (packed: rows of exactly max_seq_length tokens)
    grad_accum: int = 1  # micro-batches per optimizer step (>= 1)
    max_steps: Optional[int] = None  # None: epochs x steps per epoch
    epochs: float = 1.0  # passes over the data when max_steps is null (> 0; fractions allowed)
    lr: float = 2e-4  # peak learning rate (> 0)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (>= 0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW [beta1, beta2], each in [0, 1)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: block-quantised 8-bit optimizer state
    schedule: Literal["linear", "cosine", "constant"] = "cosine"  # learning-rate decay after the warm-up
    warmup_steps: int = 0  # steps of linear warm-up (>= 0); when > 0 it wins over warmup_ratio
    warmup_ratio: float = 0.0  # warm-up as a share of the run's steps, in [0, 1]
    max_grad_norm: Optional[float] = 1.0  # clip the gradient norm to this (> 0); null: no clipping
    eval_every: Optional[int] = None  # steps; None: at the end only
    eval_batches: Optional[int] = None  # cap eval micro-batches
    save_every: Optional[int] = None  # steps; None: at the end only
    keep_last: int = 2  # checkpoints kept in checkpoints/ (>= 1; older ones are deleted)
    log_every: int = 1  # steps between metrics lines (>= 1)
    # activations per layer: none keeps them (fastest), recompute-mlp / checkpoint recompute in the backward,
    # offload keeps them in CPU memory; auto keeps what fits in free GPU memory
    memory: Literal["auto", "none", "recompute-mlp", "checkpoint", "offload"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard the model (FSDP2 fully_shard)
    progress: bool = True  # a progress bar; false: one plain line per logged step
    tensorboard: bool = True  # TensorBoard event files in the run folder
    plot: bool = True  # loss.png in the run folder at the end


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model and how it is loaded
    lora: LoraConfig = field(default_factory=LoraConfig)  # the adapters (or a full fine-tune)
    data: DataConfig = field(default_factory=DataConfig)  # the training data and how it becomes tokens
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # what the loss is
    train: TrainSection = field(default_factory=TrainSection)  # the optimisation and the run folder

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, overrides: list[str] | None = None) -> "TrainConfig":
        raw = dict(raw or {})
        for item in overrides or []:
            _apply_override(raw, item)
        cfg = _build(cls, raw, "")
        cfg.check()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {path.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        try:
            raw = _load_yaml(path.read_text(encoding="utf-8"), str(path))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with sections {_allowed(cls)}")
        cfg = cls.from_dict(raw, overrides)
        from .rewards import resolve_spec

        # a reward file named relative to the config is recorded absolute: the run works from any directory
        cfg.objective.grpo.rewards = [resolve_spec(r, path.resolve().parent) for r in cfg.objective.grpo.rewards]
        if Path(cfg.train.output_dir).expanduser().resolve() == path.resolve().parent:
            raise ConfigError(f"train.output_dir {_short(cfg.train.output_dir)} is the folder of the config file "
                              f"{path.name}: a run writes its own config.yaml, metrics and checkpoints there; set a "
                              "folder of its own, e.g. runs/my-run")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check(self) -> None:
        """Value checks beyond types (ranges and combinations)."""
        t, o = self.train, self.objective
        try:  # a string ("all-linear", "q,v") or short names become the full list, in add_lora's order
            self.lora.target_modules = list(normalize_targets(self.lora.target_modules))
        except ValueError as e:
            raise ConfigError(f"lora.target_modules: {e}") from None
        if self.model.keep_quantized and (self.model.load_in_4bit or not self.lora.enabled):
            raise ConfigError("model.keep_quantized: true keeps a GGUF file's frozen quantised blocks, so it needs "
                              "lora.enabled: true and model.load_in_4bit: false" + (
                                  "" if self.lora.enabled else " (a full fine-tune cannot update quantised blocks)"))
        positive = {"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.keep_last": t.keep_last,
                    "train.log_every": t.log_every, "model.max_seq_length": self.model.max_seq_length,
                    "lora.r": self.lora.r}
        for key, v in positive.items():
            if v < 1:
                raise ConfigError(f"{key} must be >= 1, got {_short(v)}")
        for key, v in {"train.max_steps": t.max_steps, "train.eval_every": t.eval_every,
                       "train.save_every": t.save_every, "train.eval_batches": t.eval_batches,
                       "data.max_examples": self.data.max_examples}.items():
            if v is not None and v < 1:
                raise ConfigError(f"{key} must be >= 1 or null, got {_short(v)}")
        # floats are finite already (_coerce); these are the ranges in which each one means something
        for key, v, ok, allowed in [
                ("train.lr", t.lr, t.lr > 0, "> 0"),
                ("train.epochs", t.epochs, t.epochs > 0, "> 0"),
                ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
                ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
                ("train.warmup_ratio", t.warmup_ratio, 0.0 <= t.warmup_ratio <= 1.0, "in [0, 1]"),
                ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm is None or t.max_grad_norm > 0,
                 "> 0, or null for no clipping"),
                ("lora.alpha", self.lora.alpha, self.lora.alpha > 0, "> 0"),
                ("lora.dropout", self.lora.dropout, 0.0 <= self.lora.dropout < 1.0, "in [0, 1)"),
                ("objective.beta", o.beta, o.beta > 0, "> 0"),
                ("objective.embedding_lr_ratio", o.embedding_lr_ratio, o.embedding_lr_ratio >= 0, ">= 0"),
                ("data.eval_fraction", self.data.eval_fraction, 0.0 <= self.data.eval_fraction < 1.0, "in [0, 1)")]:
            if not ok:
                raise ConfigError(f"{key} must be {allowed}, got {_short(v)}")
        if len(t.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers [beta1, beta2], got {_short(t.betas)}")
        for i, b in enumerate(t.betas):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"train.betas[{i}] must be in [0, 1), got {_short(b)}")
        out = t.output_dir.strip()
        if not out:
            raise ConfigError("train.output_dir is empty; set a folder for the run, e.g. runs/my-run")
        resolved = Path(out).expanduser().resolve()
        if resolved in (Path.cwd().resolve(), Path(resolved.anchor), Path.home().resolve()):
            raise ConfigError(f"train.output_dir {_short(t.output_dir)} is the working directory, the home folder or "
                              "the filesystem root: a run writes config.yaml, metrics.jsonl, checkpoints/ and adapter/ "
                              "there (and --overwrite deletes them); set a folder of its own, e.g. runs/my-run")
        if o.type in ("dpo", "kto") and not self.lora.enabled:
            raise ConfigError(f"objective.type {o.type} needs lora.enabled: true — the reference model is the same "
                              "base with adapters switched off (fasttune never keeps a second copy of the model)")
        for key, v, ok, allowed in [
                ("objective.simpo_gamma", o.simpo_gamma, o.simpo_gamma >= 0, ">= 0"),
                ("objective.kto_desirable_weight", o.kto_desirable_weight, o.kto_desirable_weight > 0, "> 0"),
                ("objective.kto_undesirable_weight", o.kto_undesirable_weight, o.kto_undesirable_weight > 0, "> 0")]:
            if not ok:
                raise ConfigError(f"{key} must be {allowed}, got {_short(v)}")
        if o.type == "grpo":
            self._check_grpo()
        if o.type == "dpo" and not self.lora.enabled:
            raise ConfigError("objective.type dpo needs lora.enabled: true — the reference model is the same base "
                              "with adapters switched off (fasttune never keeps a second copy of the model)")
        if t.parallel == "fsdp" and t.optimizer == "adamw8bit":
            raise ConfigError("train.parallel: fsdp does not support train.optimizer: adamw8bit (its block-quantised "
                              "state belongs to each rank's shard and cannot be resharded); use train.optimizer: adamw")
        if t.parallel == "fsdp" and o.type == "reward":
            raise ConfigError("train.parallel: fsdp does not support objective.type reward yet (its scalar head "
                              "lives outside the sharded model); use train.parallel: ddp")
        if not 0.0 <= o.label_smoothing < 1.0:
            raise ConfigError(f"objective.label_smoothing must be in [0, 1), got {o.label_smoothing}")
        if o.label_smoothing and o.type not in ("sft", "pretrain"):
            raise ConfigError(f"objective.label_smoothing applies to sft and pretrain, not {o.type}")
        if self.data.streaming and o.type not in ("sft", "pretrain"):
            raise ConfigError(f"data.streaming works for objective.type sft and pretrain, not {o.type} (pairs are "
                              "held in memory; preference datasets are small): set data.streaming: false")
        if self.data.streaming and not t.max_steps:
            raise ConfigError("data.streaming: true needs train.max_steps (a stream's length is unknown until it "
                              "has been read, so epochs cannot be counted in steps)")
        import codecs

        try:  # an unknown codec fails here, not after the model has loaded
            codecs.lookup(self.data.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding {_short(self.data.encoding)} is not a text encoding Python knows; "
                              "use e.g. utf-8, utf-16, cp1252 or latin-1") from None
        if self.data.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.data.shuffle_buffer}")
        if o.type in ("reward", "dpo", "orpo", "simpo") and self.data.kind not in ("auto", "preference"):
            raise ConfigError(f"objective.type {o.type} trains on chosen/rejected pairs: set data.kind to "
                              f"'preference' or 'auto' (got {self.data.kind!r})")

    def _check_grpo(self) -> None:
        g, t = self.objective.grpo, self.train
        if not g.rewards:
            raise ConfigError("objective.type grpo needs objective.grpo.rewards: e.g. [exact_answer] or "
                              "[\"my_rewards.py:score\"]")
        if g.reward_weights is not None and len(g.reward_weights) != len(g.rewards):
            raise ConfigError(f"objective.grpo.reward_weights has {len(g.reward_weights)} entries for "
                              f"{len(g.rewards)} rewards")
        for key, v, ok, allowed in [
                ("num_generations", g.num_generations, g.num_generations >= 2, ">= 2 (advantages compare them)"),
                ("max_prompt_length", g.max_prompt_length, g.max_prompt_length >= 1, ">= 1"),
                ("max_new_tokens", g.max_new_tokens, g.max_new_tokens >= 1, ">= 1"),
                ("temperature", g.temperature, g.temperature > 0, "> 0"),
                ("top_p", g.top_p, 0 < g.top_p <= 1, "in (0, 1]"),
                ("top_k", g.top_k, g.top_k >= 0, ">= 0"),
                ("min_p", g.min_p, 0 <= g.min_p < 1, "in [0, 1)"),
                ("epsilon_low", g.epsilon_low, 0 <= g.epsilon_low < 1, "in [0, 1)"),
                ("epsilon_high", g.epsilon_high, g.epsilon_high >= 0, ">= 0"),
                ("beta", g.beta, g.beta >= 0, ">= 0"),
                ("num_iterations", g.num_iterations, g.num_iterations >= 1, ">= 1"),
                ("samples_every", g.samples_every, g.samples_every >= 0, ">= 0"),
                ("generation_batch_size", g.generation_batch_size,
                 g.generation_batch_size is None or g.generation_batch_size >= g.num_generations,
                 ">= num_generations (a prompt's samples decode together), or null"),
                ("length_target", g.length_target, g.length_target is None or g.length_target >= 1, ">= 1 or null")]:
            if not ok:
                raise ConfigError(f"objective.grpo.{key} must be {allowed}, got {_short(v)}")
        if g.beta > 0 and not self.lora.enabled:
            raise ConfigError("objective.grpo.beta > 0 needs lora.enabled: true — the KL reference is the same base "
                              "with adapters switched off (fasttune never keeps a second copy); or set beta: 0")
        if t.parallel == "fsdp":
            # a rollout runs a different number of decode steps on each rank, while every forward of an FSDP2
            # model is a collective (the all-gather of its shards), and merging adapters needs whole weights
            raise ConfigError("objective.type grpo does not support train.parallel: fsdp yet: generation needs the "
                              "whole weights on every rank, and FSDP2 gathers them in a collective every forward "
                              "while each rank's rollout stops after its own number of decode steps; use "
                              "train.parallel: ddp (with model.load_in_4bit: true, a replicated base takes a quarter "
                              "of the memory)")

    @property
    def train_embeddings(self) -> bool:
        te = self.objective.train_embeddings
        return self.objective.type == "pretrain" if te is None else te


# ---- validation ------------------------------------------------------------------------------------------------

def _allowed(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, (list, tuple)):  # a list is checked as the list member (its errors name the item)
            lists = [a for a in args if typing.get_origin(a) is list]
            if len(lists) == 1:
                return _coerce(lists[0], value, key)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        what = "a finite number" if isinstance(value, float) and not math.isfinite(value) else _type_name(tp)
        raise ConfigError(f"{key}: expected {what}{' or null' if type(None) in args and what != _type_name(tp) else ''}"
                          f", got {_short(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {_short(value)} is not allowed; allowed values: {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string; accept it as the number it means
            return float(value)
        except ValueError:
            pass
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp](value)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):  # .nan / .inf: no setting of fasttune means that
            raise ConfigError(f"{key}: expected a finite number, got {value}")
    return value


def _build(cls, raw, prefix: str):
    where = prefix or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {_allowed(cls)}, got {_short(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in names), key=str)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown key {_short(key)}; allowed keys in {where}: {_allowed(cls)}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name) for name, value in raw.items()}
    return cls(**kwargs)


def _field_type(key: list[str]):
    """The declared type of a dotted key (["data", "prompt_template"]), or None for an unknown key."""
    tp: Any = TrainConfig
    for part in key:
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = typing.get_type_hints(tp)[part]
    return tp


def _is_text(tp) -> bool:
    """str, a Literal of strings, or either or null: a value the user means verbatim (no YAML)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(arms) and all(_is_text(a) for a in arms)
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def _apply_override(raw: dict, item: str) -> None:
    """`train.lr=1e-4` -> raw["train"]["lr"] = 1e-4. A string key (data.prompt_template, data.format ...) takes the
    text verbatim — `[{category}] {instruction}` or `{instruction}` are templates, not YAML — less the quotes of a
    YAML-quoted value ("a: b"), and `null` or `~` for null where the key allows it; other keys parse the value as
    YAML (numbers, true/false, [lists])."""
    if "=" not in item:
        raise ConfigError(f"override {_short(item)} must look like section.key=value, e.g. train.max_steps=100")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {_short(item)}: {_short(p)} is not a section")
    tp = _field_type(parts)
    if tp is not None and _is_text(tp):
        nullable = typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)
        text = value.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # quoted as in YAML: the quotes go
            try:
                quoted = _load_yaml(text, f"--set {_short(key)}")
                value = quoted if isinstance(quoted, str) else value
            except ConfigError:  # 'a' or 'b': not one quoted scalar, so text
                pass
        node[parts[-1]] = None if nullable and text in ("null", "~") else value
        return
    try:
        node[parts[-1]] = _load_yaml(value, f"--set {_short(key)}")
    except ConfigError as e:
        raise ConfigError(f"{e}; for a string, quote it: --set '{key.strip()[:40]}=\"...\"'"
                          if tp is not None and str in _arms(tp) else str(e)) from None


def _arms(tp) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)


# ---- YAML, read as untrusted input -------------------------------------------------------------------------------

def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys, many aliases and documents that expand past MAX_NODES."""

        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    mark = self.peek_event().start_mark
                    raise ConfigError(f"{self.name}: more than {MAX_ALIASES} YAML aliases (line {mark.line + 1}); "
                                      "a config needs few or none — write the values out")
            return super().compose_node(parent, index)

        def compose_document(self):
            node = super().compose_document()
            size = _expanded_size(node, {})
            if size > MAX_NODES:
                raise ConfigError(f"{self.name}: the document expands to {size:,} values through its aliases (more "
                                  f"than {MAX_NODES:,}); refused (an alias bomb?) — write the values out")
            return node

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    k = (key_node.tag, key_node.value)
                    if k in seen:
                        raise ConfigError(f"{self.name}: key {_short(key_node.value)} appears twice in one mapping "
                                          f"(lines {seen[k] + 1} and {key_node.start_mark.line + 1}); YAML would keep "
                                          "only the last: remove one")
                    seen[k] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return Loader


def _expanded_size(node, memo: dict) -> int:
    """Nodes of `node` with aliases expanded (an alias shares its anchor's node: memoised, so this is linear)."""
    import yaml

    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once instead of looping
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(c, memo) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        n = 1
    memo[id(node)] = n
    return n


def _load_yaml(text: str, name: str):
    import yaml

    loader = _loader()(text)
    loader.name = name
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:  # one line: the problem and where (PyYAML's own text spans lines and quotes input)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{name} is not valid YAML: {problem[:120]}{where}") from None
    except RecursionError:
        raise ConfigError(f"{name} is nested too deeply to be a config") from None
    finally:
        loader.dispose()


# ---- what a resume may change ------------------------------------------------------------------------------------

# A resume continues the same optimisation: it may change how long and how fast the run goes and what it shows
# (applied to the resumed optimizer and scheduler), not what is trained or on what. train.grad_accum may change only
# with the world size, keeping grad_accum x world size (the micro-batches of one step, which the data position counts).
RESUMABLE = frozenset({
    "model.device",
    "train.output_dir", "train.max_steps", "train.epochs", "train.lr", "train.weight_decay", "train.betas",
    "train.schedule", "train.warmup_steps", "train.warmup_ratio", "train.max_grad_norm", "train.eval_every",
    "train.eval_batches", "train.save_every", "train.keep_last", "train.log_every", "train.memory", "train.parallel",
    "train.progress", "train.tensorboard", "train.plot"})
_SAME_FOLDER = frozenset({"model.path", "data.path"})  # another spelling of the same file or folder is no change


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def resume_conflicts(saved: dict, current: "TrainConfig", saved_world_size: int = 1, world_size: int = 1
                     ) -> list[str]:
    """The settings of `current` that differ from a checkpoint's recorded config (`saved`) in a way a resume cannot
    honour, as 'key old -> new'. Keys the checkpoint does not record (older fasttune) are not compared."""
    old, new = _flat(saved), _flat(current.to_dict())
    out = []
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        if a == b or key in RESUMABLE:
            continue
        if key in _SAME_FOLDER and isinstance(a, str) and isinstance(b, str) and \
                Path(a).expanduser().resolve() == Path(b).expanduser().resolve():
            continue
        if key == "train.grad_accum" and isinstance(a, int) and a * saved_world_size == b * world_size:
            continue
        out.append(f"{key} {_short(a, 40)} -> {_short(b, 40)}")
    return out
