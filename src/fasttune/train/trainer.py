"""The training loop: exact gradient accumulation, resumable checkpoints, clear failures.

One optimizer step consumes `grad_accum x world_size` micro-batches. Their total count of targets (tokens for
SFT / pre-training, pairs for preference objectives) is computed *before* the step — every rank builds the same
batch list, so the global count is known without communication — and each micro-batch loss is its sum divided
by that global count. Summing the micro-batch gradients (and, across ranks, all-reducing them; the loss is
scaled by world_size because DDP averages) therefore gives exactly the gradient of the whole step as one batch.

    from fasttune.train import TrainConfig, train
    result = train(TrainConfig.from_yaml("configs/sft_tiny.yaml"))
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters.files import RUN_RECORD, TRAINED_WEIGHTS
from ..adapters.params import param_groups
from ..build import build_model, prepare_for_training, recorded_model_path, resolve_model_path
from ..data.errors import DataError
from ..data.packing import iter_batches
from ..labels import IGNORE_INDEX
from ..models.checkpoint import save_tokenizer
from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import run_folder
from .config import ConfigError, TrainConfig, resume_conflicts
from .data import (PreparedData, batch_shape, batch_tokens, count_targets, epoch_batches, host_batch, prepare_data,
                   to_device)
from .optimizers import make_optimizer
from .objectives import RewardHead, dpo_loss, kto_loss, lm_loss, orpo_loss, reward_loss, simpo_loss
from .observe import MetricsLog, Progress, gpu_memory_gib, plot_losses
from .schedule import make_scheduler

# preference metrics summed over pairs and reported per pair (ORPO's nll is summed over tokens and reported as is)
PAIR_METRICS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "log_odds_ratio", "kto_kl")


class _SigintGuard:
    """Ctrl-C may interrupt a step's forward/backward (the step is then dropped and redone on resume), but not the
    stretch from the optimizer update to the end of that step's bookkeeping (step count, metrics line, checkpoint):
    a SIGINT there is held and raised at the step boundary, so a checkpoint never holds weights of one step with
    the count or metrics of another. Signals can only be caught in the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.pending = False
        self.previous = None

    def _hold(self, signum, frame):
        import signal

        if self.previous is not signal.SIG_IGN:  # a process that ignores SIGINT (a background job) keeps ignoring it
            self.pending = True

    def defer(self) -> None:
        import signal
        import threading

        if self.previous is None and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._hold)

    def restore(self) -> None:
        """Restore the previous handler without raising (the loop is ending anyway)."""
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
        self.pending = False

    def release(self) -> None:
        """Restore the previous handler; raise the held KeyboardInterrupt, if any, now."""
        pending = self.pending
        self.restore()
        if pending:
            raise KeyboardInterrupt


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the bad state."""


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory; the message lists the settings that would fit."""


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    step: int  # optimizer steps completed in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # per step run by this call
    eval: list[dict] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None


def _oom_message(cfg: TrainConfig, err: BaseException, during: str = "training") -> str:
    m, t = cfg.model, cfg.train
    options = []
    if not m.load_in_4bit:
        options.append("model.load_in_4bit: true (QLoRA: NF4 base weights, ~1/4 the weight memory)")
    if t.memory in ("auto", "none", "recompute-mlp", "checkpoint"):
        options.append("train.memory: offload (checkpoint every layer and keep its input in CPU memory)")
    options.append(f"a shorter model.max_seq_length (now {m.max_seq_length}), e.g. {max(128, m.max_seq_length // 2)}")
    if t.batch_size > 1:
        options.append(f"a smaller train.batch_size (now {t.batch_size}) with a larger train.grad_accum "
                       "(same global batch, exact same loss)")
    if cfg.lora.enabled and cfg.lora.r > 8:
        options.append(f"a smaller lora.r (now {cfg.lora.r})")
    if not cfg.lora.enabled:
        options.append("lora.enabled: true (a full fine-tune keeps optimizer state for every weight)")
    if t.optimizer == "adamw":
        options.append("train.optimizer: adamw8bit")
    return (f"CUDA ran out of memory {during} (" + str(err).splitlines()[0] + ").\nOptions that reduce "
            "memory:\n  - " + "\n  - ".join(options) + "\nRun `fasttune doctor` for what this GPU holds.")


class Trainer:
    """The training loop, evaluation and checkpoints over a built model. `model` (with its `tokenizer`): a CausalLM
    from fasttune.load or build.build_model, made ready here by build.prepare_for_training (the configured adapters
    added if it has none, what trains, the memory policy); None: build.build_model from the config. The process
    group and device come first (torchrun), so the model is built for this rank."""

    def __init__(self, config: TrainConfig, model: nn.Module | None = None, tokenizer=None,
                 data: PreparedData | None = None):
        self.cfg = config
        want = config.model.device
        self.dist = dist_utils.setup(use_cuda=want == "cuda" or (want == "auto" and torch.cuda.is_available()))
        self.device = self._device()
        self.output_dir = Path(config.train.output_dir)
        self.is_main = self.dist.rank == 0
        torch.manual_seed(config.train.seed)
        self.model, self.tokenizer = self._load(model, tokenizer)
        self.reward_head = None
        if config.objective.type == "reward":
            self.reward_head = RewardHead(self.model.spec.hidden_size).to(self.device, torch.float32)
        self.data = data if data is not None else prepare_data(
            config.data, self.tokenizer, config.model.max_seq_length, config.train.seed, config.objective.type,
            grpo=config.objective.grpo)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # DDP or FSDP2 under torchrun, else the model itself; before the optimizer, since fully_shard replaces
        # the parameters with sharded ones
        self.engine = dist_utils.wrap(self.model, self.dist, config.train.parallel)
        self.optimizer = self._optimizer()
        self.rl = None  # objective.type grpo: rollouts and the RL loss (fasttune.train.grpo)
        if config.objective.type == "grpo":
            from .grpo import GrpoRunner

            self.rl = GrpoRunner(self)
        self._epoch_cache: tuple[int, list] | None = None
        self._stream: tuple[int, Iterator[dict]] | None = None  # (epoch, its micro-batches) when streaming
        if self.data.streaming:  # the length is unknown until read: train.max_steps (required) sets the run
            self.steps_per_epoch, self.epoch_tail = None, 0
        else:
            self.steps_per_epoch, self.epoch_tail = divmod(len(self._epoch(0)), self.micro_per_step)
            if self.steps_per_epoch == 0:
                raise ValueError(f"the training split has {len(self._epoch(0))} micro-batches, fewer than one "
                                 f"optimizer step needs ({self.micro_per_step} = grad_accum x world size); lower "
                                 "train.grad_accum or train.batch_size, or add data")
        t = config.train
        self.total_steps = t.max_steps or max(1, int(t.epochs * self.steps_per_epoch))
        warmup = t.warmup_steps or int(t.warmup_ratio * self.total_steps)
        self.scheduler = make_scheduler(self.optimizer, t.schedule, warmup, self.total_steps)
        self.step = 0
        self.epoch = 0
        self.batch_index = 0  # next micro-batch of the current epoch
        self.tokens_seen = 0
        self.callbacks: list = []  # called as cb(trainer, record) after every step (tests use it to interrupt)
        self._shapes: set[tuple[int, int]] = set()  # distinct (rows, tokens) batch shapes the model has seen
        self._sigint = _SigintGuard()
        self._start_weight_scale: float | None = None  # the trainable weights' scale when train() starts

    # ---- setup ---------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        want = self.cfg.model.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise RuntimeError("model.device is cuda but no CUDA GPU is visible; set model.device: cpu")
            return torch.device("cuda", self.dist.local_rank)
        return torch.device("cpu")

    def _load(self, model, tokenizer):
        """The model (built from the config, or the one given, made ready to train: build.prepare_for_training)
        and its tokenizer."""
        cfg = self.cfg
        o = cfg.objective
        packed = cfg.data.packing and o.type in ("sft", "pretrain")
        # the memory policy plans for the rows of one micro-batch: a packed row, or batch_size (pairs: two each)
        rows = 1 if packed else cfg.train.batch_size * (2 if o.type in ("dpo", "orpo", "simpo", "reward") else 1)
        if model is None:
            from ..models import load_tokenizer

            model = build_model(cfg.model, cfg.lora, cfg.train.memory, batch_rows=rows,
                                train_embeddings=cfg.train_embeddings, device=self.device, dist=self.dist,
                                parallel=cfg.train.parallel, optimizer=self._planned_optimizer())
            return model, tokenizer or load_tokenizer(resolve_model_path(cfg.model.path))
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        return prepare_for_training(model, cfg.lora, cfg.train.memory, seq_len=cfg.model.max_seq_length,
                                    batch_rows=rows, train_embeddings=cfg.train_embeddings,
                                    optimizer=self._planned_optimizer()), tokenizer

    def _planned_optimizer(self) -> str | None:
        """The optimizer whose state the memory plan makes room for; None under FSDP2, where the gradients and
        moments are sharded after the plan (a whole copy would over-reserve by the world size)."""
        if self.cfg.train.parallel == "fsdp" and self.dist.enabled:
            return None
        return self.cfg.train.optimizer

    def trainable_modules(self) -> dict[str, nn.Module]:
        mods = {"model": self.model}
        if self.reward_head is not None:
            mods["reward_head"] = self.reward_head
        return mods

    def _optimizer(self) -> torch.optim.Optimizer:
        t, o = self.cfg.train, self.cfg.objective
        groups = param_groups(self.model, t.lr, o.embedding_lr_ratio, t.weight_decay,
                              extra_modules=[m for k, m in self.trainable_modules().items() if k != "model"])
        return make_optimizer(groups, t.optimizer, t.lr, (t.betas[0], t.betas[1]), t.weight_decay, self.device)

    # ---- data ----------------------------------------------------------------------------------------------

    @property
    def micro_per_step(self) -> int:
        return self.cfg.train.grad_accum * self.dist.world_size

    def _epoch(self, epoch: int) -> list[dict]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            d, t = self.cfg.data, self.cfg.train
            batches = epoch_batches(self.data.train, kind=self.data.kind, batch_size=t.batch_size, packing=d.packing,
                                    max_seq_length=self.cfg.model.max_seq_length, pad_token_id=self.pad_id,
                                    seed=t.seed + epoch, shuffle=d.shuffle)
            if self.rl is not None:  # num_iterations: each step's prompts are trained on for mu steps
                from .grpo import repeat_groups

                batches = repeat_groups(batches, self.micro_per_step, self.cfg.objective.grpo.num_iterations)
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def _stream_batches(self, epoch: int) -> Iterator[dict]:
        """Micro-batches of a streamed epoch: the file is re-read and tokenised, shuffled within the buffer (seeded
        by the epoch), batched as it comes; a resumed run skips the micro-batches its checkpoint had consumed."""
        d, t = self.cfg.data, self.cfg.train
        self.data.train.set_epoch(epoch)
        batches = iter_batches(self.data.train, batch_size=t.batch_size, packing=d.packing,
                               max_seq_length=self.cfg.model.max_seq_length, pad_token_id=self.pad_id,
                               shuffle=d.shuffle, seed=t.seed + epoch)
        return itertools.islice(batches, self.batch_index, None)

    def _next_streamed_group(self) -> list[dict]:
        while True:
            if self._stream is None or self._stream[0] != self.epoch:
                self._stream = (self.epoch, self._stream_batches(self.epoch))
            group = list(itertools.islice(self._stream[1], self.micro_per_step))
            if len(group) == self.micro_per_step:
                self.batch_index += self.micro_per_step
                return group
            if self.batch_index == 0:
                raise DataError(f"the training stream of {self.cfg.data.path} holds {len(group)} micro-batches, "
                                f"fewer than one optimizer step needs ({self.micro_per_step})")
            self.epoch, self.batch_index, self._stream = self.epoch + 1, 0, None  # the tail waits, as for lists

    def _next_group(self) -> list[dict]:
        """The micro-batches of the next optimizer step (all ranks' share), advancing the data position."""
        if self.data.streaming:
            return self._next_streamed_group()
        while True:
            batches = self._epoch(self.epoch)
            if self.batch_index + self.micro_per_step <= len(batches):
                group = batches[self.batch_index:self.batch_index + self.micro_per_step]
                self.batch_index += self.micro_per_step
                return group
            self.epoch += 1  # the incomplete tail of an epoch is skipped (it is in the next epoch's shuffle)
            self.batch_index = 0

    # ---- one step ------------------------------------------------------------------------------------------

    def _reference(self):
        from ..adapters import disable_adapters

        return disable_adapters(self.model)

    def micro_loss(self, batch: dict, num_tokens: int, num_pairs: int) -> tuple[torch.Tensor, dict]:
        o = self.cfg.objective
        if o.type in ("sft", "pretrain"):
            return lm_loss(self.engine, batch, num_tokens, o.label_smoothing)
        if o.type == "reward":
            return reward_loss(self.engine, self.reward_head, batch, num_pairs)
        if o.type == "dpo":
            return dpo_loss(self.engine, batch, num_pairs, o.beta, self._reference, logits_model=self.model)
        if o.type == "simpo":
            return simpo_loss(self.engine, batch, num_pairs, o.beta, o.simpo_gamma, logits_model=self.model)
        if o.type == "kto":
            return kto_loss(self.engine, batch, num_pairs, o.beta, o.kto_desirable_weight, o.kto_undesirable_weight,
                            self._reference, logits_model=self.model)
        return orpo_loss(self.engine, batch, num_pairs, num_tokens, o.beta, logits_model=self.model)

    def accumulate(self, group: list[dict]) -> dict:
        """Forward/backward over one step's micro-batches (this rank's share), leaving the summed gradients in
        `.grad`. Returns the step's loss (all ranks, read back: a host sync) and metrics; raises TrainingDiverged on
        NaN/inf. The training loop uses `_accumulate`, which leaves the loss on the device."""
        total, record = self._accumulate(group)
        record.update({k: float(v) for k, v in record.items() if isinstance(v, torch.Tensor)})
        record["loss"] = float(total)
        if not math.isfinite(record["loss"]):
            self._diverged(f"the loss is {record['loss']}")
        return record

    def _check_labels(self, group: list[dict]) -> None:
        """Labels must index the vocabulary: checked on the host (the GPU loss cannot report them without a sync)."""
        vocab = self.model.spec.vocab_size
        for b in group:
            labels = b["labels"]
            if bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any()):
                raise DataError(f"a batch holds label ids outside [0, {vocab}) (and not -100): the tokenizer's "
                                f"vocabulary is larger than the model's embedding rows",
                                hint="run `fasttune doctor MODEL_DIR` and resize the embeddings or fix the tokenizer")

    def _accumulate(self, group: list[dict]) -> tuple[torch.Tensor, dict]:
        """`accumulate` without reading anything back: (the step's summed loss as a float64 device tensor, metrics).
        Every micro-batch is prepared on the host (document layout, pinned memory) and copied without blocking
        before the first forward, so the copies overlap the compute."""
        # counted on the host from the whole group (every rank holds it): no device sync, no communication
        counts = [count_targets(b, self.data.kind) for b in group]
        num_tokens = sum(c[0] for c in counts)
        num_pairs = sum(c[1] for c in counts)
        tokens = sum(batch_tokens(b) for b in group)
        self._check_labels(group)
        mine = group[self.dist.rank::self.dist.world_size]
        pin = self.device.type == "cuda"
        prepared = [to_device(host_batch(b, pin), self.device) for b in mine]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        extra: dict[str, torch.Tensor] = {}  # preference metrics, summed on the device
        for i, batch in enumerate(prepared):
            sync = i == len(prepared) - 1
            with dist_utils.no_sync(self.engine, enabled=not sync):
                loss, metrics = self.micro_loss(batch, num_tokens, num_pairs)
                (loss * self.dist.world_size).backward()
            total += loss.detach().double()
            for k, v in metrics.items():
                if k in PAIR_METRICS or k == "nll":
                    extra[k] = extra.get(k, 0) + torch.as_tensor(v, dtype=torch.float64, device=self.device)
            self._shapes.add(batch_shape(batch))
        if self.reward_head is not None:
            dist_utils.all_reduce_grads(self.reward_head.parameters(), self.dist)
        record: dict = {"tokens": tokens, "target_tokens": num_tokens}
        if num_pairs:  # device tensors until the step's one read (train_step), reduced over ranks in one call
            keys = sorted(extra)
            summed = dist_utils.all_reduce_sum(torch.stack([total] + [extra[k] for k in keys]), self.dist)
            total = summed[0]
            record["pairs"] = num_pairs
            for k, v in zip(keys, summed[1:]):
                record[k] = v / num_pairs if k in PAIR_METRICS else v
        else:
            total = dist_utils.all_reduce_sum(total, self.dist)
        return total, record

    def _diverged(self, what: str):
        self.optimizer.zero_grad(set_to_none=True)
        # "good": finite weights, not blown up against the run's start (see ckpt.last_good_checkpoint); a newer
        # checkpoint may hold weights that are finite but already ruined, which a plain --resume would pick
        last = ckpt.last_good_checkpoint(self.output_dir, reference=self._start_weight_scale)
        raise TrainingDiverged(
            f"{what} at step {self.step + 1}; stopped without updating the weights. "
            + (f"The last good checkpoint is {last}: change the config, then resume from it with --resume {last}. "
               if last else "No checkpoint with sound weights was written yet. ")
            + "Usual causes: a learning rate too high (now "
            f"{self.cfg.train.lr}), no gradient clipping (train.max_grad_norm), fp16 overflow (use bfloat16), "
            "a data batch with no target tokens, or a token whose embedding row is untrained (all zero: a document "
            "that starts with it keeps an all-zero hidden state, and RMSNorm's backward multiplies its gradient by "
            "1/sqrt(eps) at every norm); `fasttune doctor MODEL --data DATA` lists such tokens.")

    def train_step(self, group: list[dict]) -> dict:
        """One optimizer step: accumulate gradients over `group`, clip, step the optimizer and the schedule. The
        step's one host sync reads the loss and the gradient norm together, before the update."""
        total, record = self._accumulate(group) if self.rl is None else self.rl.accumulate(group)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # the norm is taken even without clipping: a finite loss can still back-propagate inf/NaN gradients, and
        # one such update would poison the weights (and the next checkpoint) before the loss showed it
        max_norm = self.cfg.train.max_grad_norm
        if max_norm is None and hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: the norm, no rescale
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        norm = dist_utils.full_tensor(norm).to(device=total.device, dtype=torch.float64)
        metric_keys = [k for k, v in record.items() if isinstance(v, torch.Tensor)]
        loss_value, grad_norm, *metric_values = torch.stack(  # the step's one read
            [total, norm.reshape(())] + [record[k] for k in metric_keys]).tolist()
        record.update(zip(metric_keys, metric_values))
        record["loss"] = loss_value
        if not math.isfinite(loss_value):
            self._diverged(f"the loss is {loss_value}")
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm}")
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        self._sigint.defer()  # from here the step happens: an interrupt waits for the step boundary
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record["grad_norm"] = grad_norm
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.data.eval:
            return {}
        d, t = self.cfg.data, self.cfg.train
        batches = epoch_batches(self.data.eval, kind=self.data.kind, batch_size=t.batch_size, packing=d.packing,
                                max_seq_length=self.cfg.model.max_seq_length, pad_token_id=self.pad_id,
                                seed=0, shuffle=False)
        if t.eval_batches:
            batches = batches[: t.eval_batches]
        counts = [count_targets(b, self.data.kind) for b in batches]
        num_tokens, num_pairs = sum(c[0] for c in counts), sum(c[1] for c in counts)
        self.model.eval()
        total, extra = 0.0, {}
        mine = batches[self.dist.rank::self.dist.world_size]
        # every rank runs the same number of forwards: under FSDP2 each forward is a collective (parameter
        # all-gathers), so a rank with one batch fewer would leave the others waiting forever. The extra forward
        # repeats a batch and its result is discarded.
        rounds = -(-len(batches) // self.dist.world_size)
        try:
            for i in range(rounds):
                batch = mine[i] if i < len(mine) else batches[0]
                loss, metrics = self.micro_loss(to_device(host_batch(batch, pin=False), self.device), num_tokens,
                                                num_pairs)
                if i >= len(mine):
                    continue
                total += float(loss)
                for k, v in metrics.items():
                    extra[k] = extra.get(k, 0.0) + float(v)  # evaluation may read back: it is not the hot path
        finally:
            self.model.train()
        total = float(dist_utils.all_reduce_sum(torch.tensor(total, dtype=torch.float64, device=self.device), self.dist))
        extra = dist_utils.all_reduce_dict(extra, self.dist, self.device)
        out = {"eval_loss": total}
        if num_pairs:
            out["eval_reward_accuracy"] = extra.get("reward_accuracy", 0.0) / num_pairs
            out["eval_reward_margin"] = extra.get("reward_margin", 0.0) / num_pairs
        return out

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "tokens_seen": self.tokens_seen,
                "total_steps": self.total_steps, "world_size": self.dist.world_size,
                "config": self.cfg.to_dict()}

    def _optimizer_state(self) -> dict:
        """The optimizer state keyed by parameter name, whole tensors (gathered on rank 0 under FSDP2), so a
        checkpoint resumes on one process, DDP or FSDP2 at any world size. With a reward head (outside the model)
        it is the plain `optimizer.state_dict()`."""
        if self.reward_head is None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict) -> None:
        if self.reward_head is None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)

    def save_checkpoint(self, rng: dict | None = None) -> Path | None:
        if dist_utils.is_sharded(self.model):  # FSDP2: every rank writes its own shard, nothing is gathered
            path = ckpt.save_sharded_checkpoint(self.output_dir, self.step, model=self.model,
                                                optimizer=self.optimizer, scheduler=self.scheduler,
                                                trainer_state=self._state(), keep_last=self.cfg.train.keep_last,
                                                is_main=self.is_main, barrier=lambda: dist_utils.barrier(self.dist),
                                                rng=rng)
            dist_utils.barrier(self.dist)
            return path
        weights = ckpt.trainable_state(self.trainable_modules())
        optimizer_state = self._optimizer_state()
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(self.output_dir, self.step, weights=weights, optimizer_state=optimizer_state,
                                        scheduler=self.scheduler, trainer_state=self._state(),
                                        keep_last=self.cfg.train.keep_last, rng=rng)  # rng: None = now; after an
            # interrupt, the RNG as it was at the start of the dropped step (written before the rename: atomic)
        dist_utils.barrier(self.dist)
        return path or ckpt.checkpoint_root(self.output_dir) / f"{ckpt.PREFIX}{self.step:06d}"

    def check_resume(self, path: str | os.PathLike) -> None:
        check_resume(self.cfg, path, self.dist.world_size)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.check_resume(path)
        state = ckpt.load_checkpoint(path)
        # the settings a resume may change (lr, betas, weight decay, schedule) come from this config, not the
        # checkpoint: keep them before loading the checkpoint's optimizer and scheduler state over them
        fresh = [{k: g[k] for k in ("weight_decay", "betas") if k in g} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        if ckpt.is_sharded_checkpoint(path):
            if self.reward_head is not None:
                raise ckpt.CheckpointError(f"{path} is a sharded (FSDP2) checkpoint, which never holds a reward "
                                           "head; resume a reward model from a checkpoint written without FSDP")
            ckpt.load_sharded_weights_and_optimizer(path, self.model, self.optimizer)
        else:
            ckpt.load_trainable_state(self.trainable_modules(), state["weights"], str(path))
            try:
                self._load_optimizer_state(state["optimizer"])
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                raise ckpt.CheckpointError(f"{path}/optimizer.pt does not fit this model's optimizer ({type(e).__name__}"
                                           f": {str(e).splitlines()[0][:100] if str(e) else ''}); resume from another "
                                           "checkpoint, or start a new run") from None
        try:
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ckpt.CheckpointError(f"{path}/scheduler.pt is not a scheduler state ({type(e).__name__}); resume "
                                       "from another checkpoint") from None
        self.scheduler.base_lrs = base_lrs
        for g, f, base, factor in zip(self.optimizer.param_groups, fresh, base_lrs, self.scheduler.lr_lambdas):
            g.update(f)
            g["initial_lr"] = base
            g["lr"] = base * factor(self.scheduler.last_epoch)  # what LambdaLR computes for this step
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports
        ts = state["trainer_state"]
        if ts.get("world_size", 1) != self.dist.world_size:
            # the data position counts micro-batches, so it carries over to another world size exactly when the
            # step boundaries line up; say so rather than silently shifting the data
            if ts["batch_index"] % self.micro_per_step:
                raise ckpt.CheckpointError(
                    f"{path} was written with world size {ts['world_size']}; its data position ({ts['batch_index']} "
                    f"micro-batches) is not a whole number of steps at world size {self.dist.world_size} x grad_accum "
                    f"{self.cfg.train.grad_accum}; resume with the world size it was written with")
        self.step, self.epoch, self.batch_index = ts["step"], ts["epoch"], ts["batch_index"]
        self._stream = None
        self.tokens_seen = ts.get("tokens_seen", 0)
        ckpt.set_rng_state(state["rng"], f"{path}/rng.pt")

    def save_adapter(self, path: str | os.PathLike | None = None) -> Path:
        """The trained weights (adapters, and embeddings / reward head when trained) with a config naming the base:
        trainable.safetensors + fasttune_adapter.json   (what `load_trained` / `fasttune chat --adapter` read)
        adapter_model.safetensors + adapter_config.json (PEFT's format, for `fasttune export` and PEFT)
        tokenizer files"""
        path = Path(path or self.output_dir / "adapter")
        weights = ckpt.trainable_state(self.trainable_modules())
        if self.is_main:
            from safetensors.torch import save_file

            # written whole into a temporary folder, then renamed over the old one (run_folder.replace_dir): a
            # crash never leaves new weights beside an old PEFT copy or a half-written tokenizer
            final, path = path, run_folder.temp_dir_for(path)
            try:
                save_file(weights, str(path / TRAINED_WEIGHTS), metadata={"format": "pt"})
                # the base resolved (a relative model.path meant the cwd of this run): the adapter works from anywhere
                meta = {"base_model": recorded_model_path(self.cfg.model.path), "lora": self.cfg.to_dict()["lora"],
                        "objective": self.cfg.objective.type, "train_embeddings": self.cfg.train_embeddings,
                        "max_seq_length": self.cfg.model.max_seq_length, "step": self.step,
                        # how the training text was formatted: chat and generate must format prompts the same way
                        "chat_template": self.cfg.data.chat_template, "system_prompt": self.cfg.data.system_prompt}
                (path / RUN_RECORD).write_text(json.dumps(meta, indent=2))
                save_tokenizer(self.tokenizer, path)
                if self.cfg.lora.enabled and not dist_utils.is_sharded(self.model):
                    # PEFT's layout too (adapter_model.safetensors + adapter_config.json), read by `fasttune export`,
                    # PEFT and other tools; trained embeddings / reward heads are only in trainable.safetensors
                    from ..adapters.peft import save_adapter

                    save_adapter(self.model, path, base_model_name_or_path=str(
                        Path(resolve_model_path(self.cfg.model.path)).resolve()))
            except BaseException as e:
                import shutil

                shutil.rmtree(path, ignore_errors=True)
                if isinstance(e, Exception) and run_folder.is_disk_full(e):
                    last = ckpt.latest_checkpoint(self.output_dir)
                    raise ckpt.DiskFull(f"disk full while writing the adapter {final} (the previous one, if any, is "
                                        "untouched); free space and write it again with --resume"
                                        + (f" (the newest checkpoint is {last})" if last else "")) from None
                raise
            run_folder.replace_dir(path, final)
            path = final
        dist_utils.barrier(self.dist)
        return path

    # ---- the loop ------------------------------------------------------------------------------------------

    def train(self, resume: str | os.PathLike | bool | None = None, overwrite: bool = False) -> TrainResult:
        """Train to total_steps. `resume`: True continues from the newest checkpoint in output_dir, a path from
        that checkpoint; `overwrite` deletes a previous run's outputs first. The run folder is locked for the whole
        call, and a folder holding another run is refused without one of the two (see run_folder)."""
        resume_path = run_folder.find_resume(self.output_dir, resume)
        if resume_path is not None:
            self.check_resume(resume_path)  # before anything in the folder changes
        # one process (rank 0) holds the lock; the other ranks only read the checkpoint
        lock = run_folder.prepare(self.output_dir, resume=resume_path is not None, overwrite=overwrite) \
            if self.is_main else None
        try:
            if resume_path is not None:
                self.load_checkpoint(resume_path)
            # the trainable weights' scale at the start: what "blown up" is measured against after a divergence
            self._start_weight_scale = ckpt.weight_scale(
                p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                for g in self.optimizer.param_groups for p in g["params"])[1]
            if self.is_main:
                run_folder.write_text(self.output_dir / "config.yaml", self.cfg.to_yaml())
            return self._run(resume_path)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, resume_path: Path | None) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        log = MetricsLog(self.output_dir / "metrics.jsonl", resume_step=self.step if resume_path else None,
                         tensorboard=t.tensorboard, enabled=self.is_main)
        progress = Progress(self.total_steps, self.step, enabled=self.is_main and t.progress, every=t.log_every)
        say = progress.write if self.is_main else (lambda _s: None)
        n_params = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        n_train = "streamed" if self.data.streaming else len(self.data.train)
        say(f"fasttune: {cfg.objective.type} on {self.device}, {n_train} train / {len(self.data.eval)} "
            f"eval examples ({self.data.summary or self.data.kind}); {n_params:,} trainable parameters; "
            f"global batch = {t.batch_size} per device x {t.grad_accum} accumulation x {self.dist.world_size} "
            f"device(s); {self.total_steps} steps"
            + (f"; the last {self.epoch_tail} micro-batch(es) of an epoch do not fill a step and wait for the next "
               "epoch's shuffle" if self.epoch_tail else "")
            + ("; model loaded straight into FSDP2 shards" if self.model.loaded_into_shards else "")
            + (f"; resumed from {resume_path} at step {self.step}" if resume_path else ""))
        say(self._batch_report())
        result = TrainResult(self.output_dir, None, self.step)
        start = time.perf_counter()
        step_start = start  # wall clock of a step: from the end of the previous one (data included, eval excluded)
        run_tokens, run_seconds = 0, 0.0
        rng_at_step, in_step = None, False
        try:
            while self.step < self.total_steps:
                rng_at_step = ckpt.rng_state()
                position = (self.epoch, self.batch_index)
                group = self._next_group()
                t0 = time.perf_counter()
                try:
                    in_step = True
                    record = self.train_step(group)
                    in_step = False
                except BaseException:
                    self.epoch, self.batch_index = position  # the step did not happen
                    self._stream = None  # a stream cannot rewind: it is re-opened at the restored position
                    raise
                now = time.perf_counter()
                dt = now - step_start
                self.step += 1
                self.tokens_seen += record["tokens"]
                run_tokens, run_seconds = run_tokens + record["tokens"], run_seconds + dt
                # tokens/s: real tokens (padding excluded) over the wall clock of the step, data loading included;
                # step_s: the compute part alone (from having the batches to the end of the update)
                record = {"step": self.step, "epoch": self.epoch, **record, "tokens_per_s": record["tokens"] / dt,
                          "step_s": now - t0, "elapsed_s": now - start}
                peak = gpu_memory_gib()
                if peak is not None:
                    record["peak_memory_gib"] = peak
                result.losses.append(record["loss"])
                progress.update(record["loss"], record["lr"], record["tokens_per_s"])
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    log.log(record)
                self._sigint.release()  # the step is complete and recorded: a held Ctrl-C is raised here
                last = self.step == self.total_steps
                if (t.eval_every and self.step % t.eval_every == 0) or (last and self.data.eval):
                    ev = {"step": self.step, **self.evaluate()}
                    if len(ev) > 1:
                        result.eval.append(ev)
                        log.log(ev)
                        say("step {step}: ".format(**ev) + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()
                                                                    if k != "step"))
                if (t.save_every and self.step % t.save_every == 0) or last:
                    result.checkpoint = self.save_checkpoint()
                for cb in self.callbacks:
                    cb(self, record)
                step_start = time.perf_counter()  # evaluation and checkpoints are not training time
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            # interrupted inside a step: that step is dropped, so restore the RNG it started from
            result.checkpoint = self.save_checkpoint(rng=rng_at_step if in_step else None)
            result.interrupted = True
            say(f"interrupted at step {self.step}: checkpoint saved to {result.checkpoint}; "
                "continue with `fasttune train CONFIG --resume`")
        except torch.OutOfMemoryError as e:
            raise OutOfMemory(_oom_message(cfg, e)) from None
        finally:
            self._sigint.restore()
            progress.close()
            log.close()
            if self.is_main and t.plot:  # also after an interruption or a NaN stop: the curve shows what happened
                png = plot_losses(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png",
                                  title=f"{cfg.objective.type}: {Path(cfg.model.path).name}")
                if png:
                    say(f"loss curve: {png}")
        result.step = self.step
        if run_seconds:
            peak = gpu_memory_gib()
            say(f"trained {run_tokens:,} tokens in {run_seconds:.1f} s of steps ({time.perf_counter() - start:.1f} s "
                f"in all): {run_tokens / run_seconds:,.0f} tokens/s"
                + (f", peak GPU memory {peak:.2f} GiB" if peak is not None else "")
                + f"; batch shapes seen: {sorted(self._shapes)}")
        if not result.interrupted:
            result.adapter_dir = self.save_adapter()
            say(f"saved {result.adapter_dir}")
        return result

    def _batch_report(self) -> str:
        """The shapes the model will see and how full they are (from the first epoch's batches)."""
        if self.data.streaming:
            return ("batches: streamed; packed rows are batch_size x max_seq_length" if self.cfg.data.packing
                    else "batches: streamed, padded to length buckets")
        batches = self._epoch(self.epoch)
        shapes = sorted({batch_shape(b) for b in batches})
        real = sum(batch_tokens(b) for b in batches)
        slots = sum(b["input_ids"].numel() for b in batches)
        kind = "packing" if self.cfg.data.packing and self.data.kind not in ("preference", "unpaired", "prompts") \
            else "padding"
        return (f"batches: {len(batches)} per epoch in {len(shapes)} shape(s) "
                f"{shapes if len(shapes) <= 12 else str(shapes[:12])[:-1] + ', ...]'}; {kind} fills "
                f"{100 * real / max(slots, 1):.1f}% of the token slots (real tokens / rows x length)")


def check_resume(cfg: TrainConfig, path: str | os.PathLike, world_size: int) -> None:
    """Refuse (ConfigError) a checkpoint whose recorded config differs from `cfg` in a setting a resume cannot
    change (config.RESUMABLE says which it can)."""
    ts = ckpt.read_trainer_state(path, for_resume=True)
    if not isinstance(ts.get("config"), dict):
        return  # written before checkpoints recorded their config: the weights' shapes are still checked
    refused = resume_conflicts(ts["config"], cfg, ts.get("world_size", 1), world_size)
    if refused:
        raise ConfigError(f"cannot resume from {path}: {'; '.join(refused)}. A resume may change the length, "
                          "schedule, learning rate, optimizer hyper-parameters, cadence and display settings, not the "
                          "model, LoRA, data, objective or batch; put those back, or start a new run (--overwrite, or "
                          "another train.output_dir)")


def train(config: TrainConfig, resume: str | os.PathLike | bool | None = None, model=None, tokenizer=None,
          overwrite: bool = False) -> TrainResult:
    """Build a Trainer from `config` and run it (the Python face of `fasttune train`). The run folder is checked
    first (in use, holding another run, nothing or the wrong thing to resume), before minutes go into loading the
    model; the Trainer checks again under the folder's lock."""
    run_folder.check_start(config.train.output_dir, resume=bool(resume), overwrite=overwrite)
    resume_path = run_folder.find_resume(config.train.output_dir, resume)
    if resume_path is not None:
        check_resume(config, resume_path, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        trainer = Trainer(config, model=model, tokenizer=tokenizer)
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(_oom_message(config, e, during="loading the model")) from None
    return trainer.train(resume=resume, overwrite=overwrite)
