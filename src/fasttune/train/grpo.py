"""Online RL: GRPO and its variants (Dr. GRPO, GSPO), on fasttune's own generation sharing the training weights.

One optimizer step: for each prompt x of the step, G completions o_1..o_G are sampled from the rollout policy
pi_old (the model as it is at the rollout, logits / temperature tau), scored by the reward functions
(R_i = sum_f w_f r_f(x, o_i)), and trained on with the model's adapters on; the reference pi_ref is the same
model with its adapters switched off (`disable_adapters`), never a second copy.

Advantages, per group of G completions of one prompt:
    grpo, gspo:  A_i = (R_i - mean_g R) / (std_g R + 1e-4)      (std with Bessel's correction, as TRL)
    dr_grpo:     A_i = R_i - mean_g R                             (no std normalisation)
Per completion token t (m_it = 1 on completion tokens, 0 elsewhere):
    logp_it  = log softmax(z_it / tau)[o_it]     (the sampling distribution's log-probability; top-k / top-p /
                                                  min-p truncation is not part of it, as in TRL)
    r_it     = logp_it - old_it,   rho_it = exp(r_it)             (old: pi_old's log-probability, no gradient)
    k_it     = exp(ref_it - logp_it) - (ref_it - logp_it) - 1     (k3 estimator of KL(pi_theta || pi_ref), >= 0)
    c_it     = min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
Losses, N = completions in the whole optimizer step (prompts x G, every micro-batch and rank), so the micro-batch
losses sum to the step's loss exactly:
    grpo:     L = (1/N) sum_i (1/|o_i|) sum_t m_it (-c_it + beta k_it)          (per-sequence length normalisation)
    dr_grpo:  L = (1/(N L_max)) sum_i sum_t m_it (-c_it + beta k_it)            (L_max = max_new_tokens: constant)
    gspo:     s_i = exp((1/|o_i|) sum_t m_it r_it)                             (sequence-level importance ratio)
              L = (1/N) sum_i [-min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
                               + beta (1/|o_i|) sum_t m_it k_it]
Gradients (autograd through these formulas): d rho_it / d logp_it = rho_it, d k_it / d logp_it = 1 - exp(ref - logp);
a clipped term has zero gradient. With num_iterations (mu) = 1 the rollout is trained on once and old = logp
detached, so rho = 1 but d rho = d logp: the plain policy gradient A_i d logp_it. With mu > 1 each rollout is
reused for mu optimizer steps (the prompt batches repeat mu times in the data order) and old is computed once, right
after generation, so the ratio measures how far the updates moved the policy.

The log-probabilities come from `objectives.token_logprobs` (`kernels.fused_linear_token_logprobs`): the LM head
runs chunk by chunk and the (tokens x vocab) logits are never materialised for the whole batch, in the forward or
the backward.

Phases alternate on one copy of the weights: generation (fasttune.generation's Generator on the training model: no
graph, adapters merged into dense weights for the rollout or applied unmerged over a quantised base; its static KV
cache is released before training unless `keep_kv_cache`), then the no-grad passes for old / reference
log-probabilities, then the training forward/backward.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.packing import bucket_length
from ..labels import IGNORE_INDEX, next_token_targets
from . import distributed as dist_utils
from .objectives import token_logprobs
from .rewards import build_rewards, score

ADVANTAGE_EPS = 1e-4
LOSS_TYPES = ("grpo", "dr_grpo", "gspo")


# ---- the loss ---------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, num_generations: int, scale: bool) -> torch.Tensor:
    """rewards (P * G,) grouped by prompt (G consecutive) -> advantages (P * G,)."""
    r = rewards.reshape(-1, num_generations)
    a = r - r.mean(-1, keepdim=True)
    if scale:
        a = a / (r.std(-1, keepdim=True) + ADVANTAGE_EPS)  # G >= 2 (checked in the config)
    return a.reshape(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str, epsilon_low: float,
              epsilon_high: float, beta: float, num_sequences: int, max_completion_length: int
              ) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch (see the module doc), summed over its sequences and divided by the step's
    `num_sequences`. logp, old_logp, ref_logp, mask: (R, T); advantages: (R,). old_logp None: logp detached (mu = 1);
    ref_logp None: no KL term (beta must be 0). Metrics are 0-d device tensors, summed (not averaged) over the
    micro-batch: kl (over tokens), clipped (tokens for grpo/dr_grpo, sequences for gspo), tokens, sequences."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs the reference log-probabilities")
    m = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    log_ratio = (logp - old) * m
    lengths = m.sum(-1).clamp(min=1)
    adv = advantages.to(logp.dtype)
    if ref_logp is not None:
        d = (ref_logp - logp) * m
        kl = (torch.exp(d) - d - 1) * m
    else:
        kl = torch.zeros_like(logp)
    lo, hi = 1 - epsilon_low, 1 + epsilon_high
    if loss_type == "gspo":
        s = torch.exp(log_ratio.sum(-1) / lengths)
        per_seq = -torch.minimum(s * adv, s.clamp(lo, hi) * adv) + beta * kl.sum(-1) / lengths
        loss = per_seq.sum() / num_sequences
        clipped = ((s < lo) & (adv < 0)) | ((s > hi) & (adv > 0))
    else:
        rho = torch.exp(log_ratio)
        a = adv[:, None]
        per_token = (-torch.minimum(rho * a, rho.clamp(lo, hi) * a) + beta * kl) * m
        if loss_type == "grpo":
            loss = (per_token.sum(-1) / lengths).sum() / num_sequences
        else:
            loss = per_token.sum() / (num_sequences * max_completion_length)
        clipped = (((rho < lo) & (a < 0)) | ((rho > hi) & (a > 0))) & mask.bool()
    metrics = {"kl": kl.detach().sum(), "clipped": clipped.sum(), "tokens": m.sum(), "sequences": logp.shape[0]}
    return loss, metrics


# ---- generation (the one place that calls the generator) --------------------------------------------------------

def make_generator(model, max_batch_size: int, max_seq_len: int, tokenizer=None):
    """fasttune.generation's Generator over the training model itself (no copy): a static KV cache of
    max_batch_size x max_seq_len, CUDA-graph decode steps on CUDA."""
    from ..generation import Generator

    return Generator(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, tokenizer=tokenizer,
                     cuda_graphs=True)


def uses_quantised_base(model) -> bool:
    """Whether an adapted layer sits on a quantised base (NF4, GGUF blocks), which cannot hold a merged weight."""
    from ..adapters import lora_layers
    from ..models.quantized import QuantizedLinear

    return any(isinstance(m.base, QuantizedLinear) for _, m in lora_layers(model))


def generate_completions(generator, prompts: list[list[int]], num_samples: int, params,
                         merge_lora: bool = False, prompt_indices: list[int] | None = None
                         ) -> list[list[list[int]]]:
    """For each prompt, `num_samples` completions (token ids, ending with the stop token when one was drawn), from
    the model as it is now (the rollout policy), in eval mode and without a graph. `params`: the generator's
    SamplingParams. `merge_lora` merges frozen adapters into dense base weights for the call (restored exactly).
    `prompt_indices`: each prompt's place in the whole step (all ranks), which picks its sampler rows."""
    with torch.no_grad():
        return generator.generate(prompts, params, num_samples=num_samples, merge_lora=merge_lora,
                                  prompt_indices=prompt_indices)


# ---- data -------------------------------------------------------------------------------------------------------

def prompt_batches(examples: list[dict], batch_size: int, pad_token_id: int, seed: int, shuffle: bool
                   ) -> list[dict]:
    """Micro-batches of `batch_size` prompts: {"input_ids", "attention_mask" (the prompts left-padded; the batch
    report reads them), "examples"}, in an order fixed by `seed`."""
    import random

    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    batches = []
    for s in range(0, len(order), batch_size):
        chosen = [examples[i] for i in order[s:s + batch_size]]
        width = max(len(e["prompt_ids"]) for e in chosen)
        ids = torch.full((len(chosen), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for i, e in enumerate(chosen):
            ids[i, width - len(e["prompt_ids"]):] = torch.tensor(e["prompt_ids"])
            mask[i, width - len(e["prompt_ids"]):] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "examples": chosen})
    return batches


def repeat_groups(batches: list, group_size: int, times: int) -> list:
    """Each step's group of `group_size` micro-batches `times` times in a row (num_iterations: a rollout is
    trained on for mu optimizer steps, and the data position still counts micro-batches); a tail that fills no
    group is dropped, as the trainer drops it."""
    if times == 1:
        return batches
    groups = [batches[i:i + group_size] for i in range(0, len(batches) - group_size + 1, group_size)]
    return [b for g in groups for _ in range(times) for b in g]


def prepare_prompts(cfg, tokenizer, max_prompt_length: int, seed: int, prompt_format: str):
    """Prompts of a dataset: a `prompt` column (text: one user turn; a list: chat messages), chat messages
    (messages / conversations; a trailing assistant turn is dropped), or data.prompt_template over the columns.
    prompt_format chat renders them through the chat template with the assistant header; raw tokenises the text
    as it is. Prompts longer than max_prompt_length tokens keep their last tokens (overlong: truncate) or are
    dropped. Every prompt is trained on (no eval split)."""
    from ..data.conversations import find_conversation_column
    from ..data.errors import DataError
    from ..data.readers import read_rows
    from ..data.template import PromptTemplate
    from ..data.tokenize import generation_prompt_ids
    from ..data.chat_templates import chat_template_for
    from .data import DEFAULT_PROMPT, PreparedData, _messages, resolve_source

    path, _ = resolve_source(cfg.path)
    template = chat_template_for(tokenizer, cfg.chat_template)
    prompt_tpl = PromptTemplate(cfg.prompt_template or DEFAULT_PROMPT)
    examples, truncated, dropped = [], 0, 0
    for index, (loc, row) in enumerate(read_rows(path, format=cfg.format, encoding=cfg.encoding,
                                                 max_line_bytes=cfg.max_line_bytes,
                                                 max_field_chars=cfg.max_field_chars)):
        if cfg.max_examples is not None and index >= cfg.max_examples:
            break
        if "prompt" in row and not cfg.prompt_template:
            messages = _messages(row["prompt"], loc)
        elif (col := find_conversation_column(row)) is not None and not cfg.prompt_template:
            messages = _messages(row[col], loc)
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            messages = [{"role": "user", "content": prompt_tpl.format(row, loc)}]
        if not messages:
            raise DataError("a row's conversation has no turn before the answer", location=loc)
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}] + messages
        if prompt_format == "chat":
            ids = generation_prompt_ids(messages, tokenizer, template)
            text = template.render(messages, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages)
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > max_prompt_length:
            if cfg.overlong == "drop":
                dropped += 1
                continue
            ids, truncated = ids[-max_prompt_length:], truncated + 1
        examples.append({"prompt_ids": ids, "prompt": text, "row": row})
    if not examples:
        raise DataError(f"no prompts in {cfg.path}", hint="use a prompt column, chat messages, or data.prompt_template")
    summary = f"{len(examples)} prompts"
    if truncated:
        summary += f"; {truncated} cut to their last {max_prompt_length} tokens"
    if dropped:
        summary += f"; dropped {dropped} longer than {max_prompt_length} tokens"
    return PreparedData("prompts", examples, [], truncated, dropped, summary)


# ---- the runner the trainer calls ---------------------------------------------------------------------------------

class GrpoRunner:
    """Rollouts and the GRPO loss for a Trainer: `accumulate(group)` has `Trainer._accumulate`'s contract."""

    def __init__(self, trainer):
        from ..chat import stop_token_ids
        from ..data.chat_templates import chat_template_for

        self.trainer = trainer
        self.cfg = trainer.cfg.objective.grpo
        g = self.cfg
        self.rewards = build_rewards(g.rewards, g.reward_weights, answer_column=g.answer_column,
                                     format_regex=g.format_regex, length_target=g.length_target,
                                     length_mode=g.length_mode, base_dir=Path.cwd())
        tok = trainer.tokenizer
        self.stop_ids = stop_token_ids(tok, chat_template_for(tok, trainer.cfg.data.chat_template))
        if not self.stop_ids:
            raise ValueError("the tokenizer has no EOS token and the chat template no end-of-turn token: GRPO "
                             "completions could only stop at max_new_tokens; set the tokenizer's eos_token")
        self.buffer: list[dict] | None = None
        self.buffer_step: int | None = None  # the step whose rollout the buffer holds
        self.generate_seconds = 0.0  # wall time of the last rollout's generation
        self.samples_path = Path(trainer.output_dir) / "samples.jsonl"
        self.generator = make_generator(trainer.model, generation_rows(trainer.cfg),
                                        g.max_prompt_length + g.max_new_tokens, tok)
        # frozen adapters merged into dense weights for a rollout (faster decode); a quantised base runs unmerged
        self.merge_lora = g.merge_lora and trainer.cfg.lora.enabled and not uses_quantised_base(trainer.model)
        self.memory_plan = plan_memory_for_grpo(trainer.cfg, trainer.model)

    # -- rollout --

    def sampling(self, seed: int):
        """The rollout's SamplingParams (the stop tokens: EOS and the chat template's end of turn)."""
        from ..generation import SamplingParams

        g = self.cfg
        return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                              top_k=g.top_k, min_p=g.min_p, stop_token_ids=list(self.stop_ids), seed=seed)

    def generate(self, batches: list[dict], seed: int, prompt_indices: list[int] | None = None
                 ) -> list[list[list[list[int]]]]:
        """Phase 1: every micro-batch's completions in one generator call (rounds of generation_batch_size
        sequences), then the KV cache is released for the training phase (unless keep_kv_cache).
        `prompt_indices`: the prompts' places in the step's whole group (default 0, 1, ...)."""
        prompts = [e["prompt_ids"] for b in batches for e in b["examples"]]
        try:
            done = generate_completions(self.generator, prompts, self.cfg.num_generations, self.sampling(seed),
                                        self.merge_lora, prompt_indices)
        finally:
            if not self.cfg.keep_kv_cache:
                self.generator.release()
        out, i = [], 0
        for b in batches:
            out.append(done[i:i + len(b["examples"])])
            i += len(b["examples"])
        return out

    @torch.no_grad()
    def rollout(self, batch: dict, completions: list[list[list[int]]]) -> dict:
        """Phase 2, one micro-batch: score the completions and tensorise them — the training rows (right-padded
        prompt + completion), advantages, and the old / reference log-probabilities when they are needed."""
        t, g = self.trainer, self.cfg
        examples = batch["examples"]
        texts, scores, rows = [], [], []
        for e, group in zip(examples, completions):
            for c in group:
                text = t.tokenizer.decode(c, skip_special_tokens=True)
                texts.append(text)
                scores.append(score(self.rewards, e["prompt"], text, e["row"]))
                rows.append((e["prompt_ids"], c))
        per_fn = torch.tensor(scores, dtype=torch.float64)  # (P*G, F)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
        total = per_fn @ weights
        adv = group_advantages(total, g.num_generations, scale=g.loss != "dr_grpo")
        cap = g.max_prompt_length + g.max_new_tokens
        length = bucket_length(max(len(p) + len(c) for p, c in rows), cap)
        ids = torch.full((len(rows), length), t.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        device = t.device
        out = {"input_ids": ids.to(device), "labels": labels.to(device),
               "advantages": adv.to(device, torch.float32), "old_logp": None, "ref_logp": None,
               "rewards": per_fn, "total_rewards": total, "lengths": [len(c) for _, c in rows],
               "texts": texts, "examples": examples}
        if g.num_iterations > 1:
            out["old_logp"] = token_logprobs(t.model, out["input_ids"], out["labels"], g.temperature)
        if g.beta > 0:
            with t._reference():
                out["ref_logp"] = token_logprobs(t.model, out["input_ids"], out["labels"], g.temperature)
        return out

    # -- the step --

    def prepare(self, group: list[dict]) -> None:
        """The rollout phase of the coming step: generate for this rank's share of `group`, score, and compute the
        old / reference log-probabilities; the buffer then serves num_iterations steps.

        Data parallel (as TRL): each rank takes its own micro-batches of the step's group (different prompts), and
        the G completions of a prompt stay on its rank, so the group advantages need no communication. The seed
        depends on (train.seed, step) only and each prompt samples from the rows of its place in the whole group,
        so the ranks draw different completions (their prompts' rows differ) and a step's rollouts are the same at
        any world size: N ranks x P prompts train on what one process x N P prompts would."""
        import time

        t = self.trainer
        W, rank = t.dist.world_size, t.dist.rank
        firsts = [0]  # each micro-batch's first prompt's place in the group
        for b in group[:-1]:
            firsts.append(firsts[-1] + len(b["examples"]))
        mine = group[rank::W]
        indices = [f + k for b, f in zip(mine, firsts[rank::W]) for k in range(len(b["examples"]))]
        self.buffer = None  # the previous rollout's tensors go before the new generation
        seed = (t.cfg.train.seed * 1_000_003 + t.step) * 4099
        start = time.perf_counter()
        completions = self.generate(mine, seed, indices)  # token lists on the host: the generation has finished
        self.generate_seconds = time.perf_counter() - start
        self.buffer = [self.rollout(b, c) for b, c in zip(mine, completions)]
        self.buffer_step = t.step
        self._write_samples(self.buffer[0])

    def accumulate(self, group: list[dict]) -> tuple[torch.Tensor, dict]:
        """Trainer._accumulate for GRPO: (the step's loss as a float64 device tensor, metrics). A new rollout every
        num_iterations steps (or when none is held, e.g. after a resume), unless `prepare` already made it."""
        t, g = self.trainer, self.cfg
        num_sequences = sum(len(b["examples"]) for b in group) * g.num_generations
        fresh = self.buffer is not None and self.buffer_step == t.step
        if not fresh and (self.buffer is None or t.step % g.num_iterations == 0):
            self.prepare(group)
        total = torch.zeros((), dtype=torch.float64, device=t.device)
        sums: dict[str, torch.Tensor] = {}
        for i, r in enumerate(self.buffer):
            with dist_utils.no_sync(t.engine, enabled=i != len(self.buffer) - 1):
                logp = token_logprobs(t.engine, r["input_ids"], r["labels"], g.temperature, logits_model=t.model)
                mask = next_token_targets(r["labels"]) != IGNORE_INDEX
                loss, m = grpo_loss(logp, r["old_logp"], r["ref_logp"], r["advantages"], mask, loss_type=g.loss,
                                    epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, beta=g.beta,
                                    num_sequences=num_sequences, max_completion_length=g.max_new_tokens)
                (loss * t.dist.world_size).backward()
            total += loss.detach().double()
            t._shapes.add(tuple(r["input_ids"].shape))
            for k in ("kl", "clipped"):
                sums[k] = sums.get(k, 0) + m[k].double()
        # host numbers of this rank's rollouts (rewards, lengths), summed (the longest completion and the generation
        # time: the maximum) over ranks in one collective under torchrun; the loss and device sums stay on the device
        host = {"completion_tokens": 0.0, "tokens": 0.0, "reward": 0.0, "reward_std": 0.0,
                "completion_length_max": float(max(max(r["lengths"]) for r in self.buffer)),
                "generate_s": self.generate_seconds if self.buffer_step == t.step else 0.0}
        for r in self.buffer:
            host["completion_tokens"] += sum(r["lengths"])
            host["tokens"] += sum(len(e["prompt_ids"]) for e in r["examples"]) * g.num_generations + sum(r["lengths"])
            for j, rw in enumerate(self.rewards):
                host[f"reward/{rw.name}"] = host.get(f"reward/{rw.name}", 0.0) + float(r["rewards"][:, j].sum())
            host["reward"] += float(r["total_rewards"].sum())
            host["reward_std"] += float(r["total_rewards"].reshape(-1, g.num_generations).std(-1).sum())
        host = dist_utils.reduce_host_numbers(host, t.dist, t.device, maximum=("completion_length_max", "generate_s"))
        stacked = dist_utils.all_reduce_sum(torch.stack([total, sums["kl"], sums["clipped"]]), t.dist)
        total, kl, clipped = stacked[0], stacked[1], stacked[2]
        seqs, ctoks = float(num_sequences), max(host["completion_tokens"], 1.0)
        record: dict = {"tokens": int(host["tokens"]), "target_tokens": int(host["completion_tokens"]),
                        # device values until the step's one read (train_step)
                        "kl": kl / ctoks, "clip_fraction": clipped / (seqs if g.loss == "gspo" else ctoks),
                        "reward": host["reward"] / seqs, "reward_std": host["reward_std"] / (seqs / g.num_generations)}
        for rw in self.rewards:
            record[f"reward/{rw.name}"] = host[f"reward/{rw.name}"] / seqs
        record["completion_length"] = host["completion_tokens"] / seqs
        record["completion_length_max"] = int(host["completion_length_max"])
        record["generate_s"] = host["generate_s"]  # the slowest rank's: the step waits for it
        return total, record

    def _write_samples(self, rollout: dict) -> None:
        t, every = self.trainer, self.cfg.samples_every
        if not t.is_main or not every or t.step % every:
            return
        e = rollout["examples"][0]
        G = self.cfg.num_generations
        with self.samples_path.open("a") as f:
            for j in range(G):
                f.write(json.dumps({
                    "step": t.step + 1, "prompt": e["prompt"], "completion": rollout["texts"][j],
                    "rewards": {rw.name: float(rollout["rewards"][j, k]) for k, rw in enumerate(self.rewards)},
                    "advantage": float(rollout["advantages"][j]), "tokens": rollout["lengths"][j]}) + "\n")


def plan_memory_for_grpo(cfg, model):
    """The memory policy (train.memory) installed again for what a GRPO step trains on (the load planned for
    max_seq_length x batch_size rows); the plan, or None with train.memory: none."""
    from .memory import apply_memory_policy

    rows, length, extra = memory_plan_inputs(cfg, model)
    if cfg.train.memory == "none":
        return None
    return apply_memory_policy(model, policy=cfg.train.memory, seq_len=length, batch_size=rows, **extra)


def memory_plan_inputs(cfg, model) -> tuple[int, int, dict]:
    """What the memory policy plans a GRPO step for: (rows, tokens per row, extra plan arguments). The training
    micro-batch is batch_size prompts x G completions of up to max_prompt_length + max_new_tokens tokens. Generation
    and training alternate, so a KV cache released after each rollout needs no room during training; one kept
    between rollouts (keep_kv_cache) is reserved on top of the planner's usual reserve, with the generator's
    concatenated projection weights, which it keeps and releases with the cache."""
    from .memory import GiB

    from .memory import free_device_bytes

    g = cfg.objective.grpo
    rows, length = cfg.train.batch_size * g.num_generations, g.max_prompt_length + g.max_new_tokens
    from ..generation import kv_cache_bytes

    kv = kv_cache_bytes(model.spec, generation_rows(cfg), length, model.model.embed_tokens.weight.dtype)
    free = free_device_bytes(next(model.parameters()).device)
    if free is not None and kv > free - GiB:  # said now, not after the first step's minutes
        raise ValueError(f"the generation KV cache ({generation_rows(cfg)} sequences x {length} tokens: "
                         f"{kv / GiB:.1f} GiB) does not fit in the {free / GiB:.1f} GiB free beside the model; lower "
                         "objective.grpo.generation_batch_size (>= num_generations), max_new_tokens or "
                         "max_prompt_length")
    extra = {}
    if g.keep_kv_cache:
        from ..generation import fused_projection_bytes

        extra["reserve_bytes"] = 2 * GiB + kv + fused_projection_bytes(model)
    return rows, length, extra


def generation_rows(cfg) -> int:
    """Sequences decoded at once (the KV cache's rows): objective.grpo.generation_batch_size, else a micro-batch's
    batch_size x num_generations."""
    g = cfg.objective.grpo
    return g.generation_batch_size or cfg.train.batch_size * g.num_generations


__all__ = ["GrpoRunner", "grpo_loss", "group_advantages", "token_logprobs", "generate_completions", "prompt_batches",
           "repeat_groups", "prepare_prompts", "memory_plan_inputs", "plan_memory_for_grpo", "generation_rows",
           "make_generator", "LOSS_TYPES"]
