"""Batched generation on the training model itself: a static KV cache, one packed prefill, CUDA-graph decode steps.

    gen = Generator(model, max_batch_size=64, max_seq_len=2048, tokenizer=tok)
    completions = gen.generate(prompt_ids, SamplingParams(max_new_tokens=512, temperature=0.9, top_p=0.95),
                               num_samples=8)          # completions[p][j]: sample j of prompt p (token ids)
    gen.release()                                      # give the KV cache back for the training phase

How a call runs:
1. prompts are split into rounds of at most max_batch_size sequences (a prompt's samples stay in one round);
2. prefill: the round's prompts are packed into one row (positions restart at 0 per prompt, their
   DocumentLayout built on the host) and run in one forward, in groups of at most `prefill_tokens` tokens; the
   cache writes each prompt's K/V into the slots of all its samples (one prefill per prompt, not per sample);
   the first token of every sample is drawn from its prompt's last logits;
3. decode: steps of fixed shape over the first S slots (S = the round's sequence count rounded up to a power of
   two, capped at max_batch_size), one token per slot, RoPE at each slot's own position, attention over each
   slot's valid length. On CUDA each step is a CUDA graph captured once per (S, sampling structure, adapter
   state): every input is a static buffer (tokens, lengths, the step counter, the sampling parameters), the
   step writes its token into an output buffer and marks rows that drew a stop token as finished on the device;
4. the host looks at the device only every `check_every` steps (whether all rows are finished: the flag is copied
   asynchronously and read when its event has completed, so the GPU never waits for the host) and, with stop
   strings, every `stop_check_interval` steps (the tokens so far are read and decoded).

Adapters: the model's own forward runs, so LoRA layers compute unmerged. With `merge_lora=True` (adapters frozen
for a rollout) the adapters are merged into dense weights for the call: into the concatenated q/k/v and gate/up
copies (below) for those projections, into the base weights for the others, which are restored bit for bit after
(see `merged_lora`); quantised bases cannot be merged (refused).

Fewer, larger launches per decode step (what batch 1 is bound by), all on by default:
- `fuse_projections`: q, k, v as one matmul and gate, up as one, over concatenated copies of those weights (see
  generation.fused: the copies cost memory, 9.1 GB at the Llama-3.1-8B shape in bf16, allocated with the KV cache,
  refreshed every call, freed by `release()`); unmerged adapters ride along in the same matmul;
- `fused`: each residual add fused into the RMSNorm after it, and in a decode step RoPE fused with the KV-cache
  write (one kernel rotates q, rotates k into its cache row, copies v) - no memory cost.
Off by default: `gemv="triton"` runs the projections of decode steps of at most kernels.gemv.MAX_ROWS sequences in
the Triton GEMV (concatenated q/k/v and gate/up, o_proj, and down_proj with the GLU as its prologue: see
generation.fused) instead of cuBLAS - on an H200 the 8B batch-1 step measured slower with it (4.91 vs 4.65 ms);
`gemv="triton-o-down"` keeps it to o_proj and down_proj at one row, where it measured faster (the step with it is not
yet measured).
The sampling path makes no host sync (it is captured in the step's graph, where a sync could not be captured).
A QLoRA (NF4) base computes each projection of a decode step of at most kernels.nf4_matmul.MAX_ROWS slots in the
fused NF4 matmul (the packed weight read once, never dequantised into a dense copy); larger steps dequantise and
run a GEMM (noted once).
"""
from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..adapters import lora_layers
from ..kernels.attention import FALLBACKS, DocumentLayout
from ..kernels.nf4_matmul import MAX_ROWS as NF4_MATMUL_MAX_ROWS
from ..models.decoder import CausalLM
from ..models.nf4_linear import NF4Linear
from .cache import StaticKVCache
from .fused import GROUPS, FusedProjections, check_gemv, check_groups, fused_projection_bytes
from .merge import merged_lora
from .sampling import SamplingParams, next_tokens

log = logging.getLogger("fasttune.generation")


@dataclass
class _Buffers:
    """The decode step's static inputs and outputs, sized for every slot (a captured step reads views of them)."""
    tokens: torch.Tensor  # (slots,) long: each slot's input token
    lengths: torch.Tensor  # (slots,) int32: keys per slot including the input token (its position + 1)
    finished: torch.Tensor  # (slots,) bool
    rows: torch.Tensor  # (slots,) long: the sampler's row id of each slot
    out: torch.Tensor  # (slots, max_new_tokens) long: generated tokens, column = step
    step: torch.Tensor  # 0-d long: the step being generated (0 = the token drawn from the prefill)
    seed: torch.Tensor  # 0-d long
    temperature: torch.Tensor  # 0-d float32
    top_p: torch.Tensor
    min_p: torch.Tensor
    stop_ids: torch.Tensor  # (capacity,) long, padded with -1


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Generator:
    """Reusable batched generator over `model` (a fasttune CausalLM, with or without LoRA, dense or quantised).
    Memory: the KV cache holds 2 x layers x max_batch_size x max_seq_len x kv_heads x head_dim values of the
    model's dtype, and with `fuse_projections` the concatenated q/k/v and gate/up weights hold a copy of those
    projections (generation.fused_projection_bytes); both are allocated at the first `generate` and freed by
    `release()`. `fuse_projections`: True (both groups), False, or a subset of ("qkv", "gate_up"). `fused`: the
    forward-only fused kernels (residual add + RMSNorm, RoPE + cache write). `gemv`: "cublas", "triton" or
    "triton-o-down", the matmuls of decode steps of few sequences (generation.fused). See the module docstring."""

    def __init__(self, model: CausalLM, max_batch_size: int, max_seq_len: int, tokenizer=None,
                 cuda_graphs: bool = True, prefill_tokens: int = 16384, check_every: int = 8,
                 fused: bool = True, fuse_projections: bool | Sequence[str] = True, gemv: str = "cublas"):
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
        self.model, self.tokenizer = model, tokenizer
        self.fused = fused
        self.gemv = check_gemv(gemv)
        if isinstance(fuse_projections, bool):
            self.projection_groups = GROUPS if fuse_projections else ()
        else:
            self.projection_groups = check_groups(fuse_projections)
        self.projections: FusedProjections | None = None
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.prefill_tokens, self.check_every = max(1, prefill_tokens), max(1, check_every)
        self.spec = model.spec
        self.device = model.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and FALLBACKS.usable("generation-cuda-graphs")
        if self.cuda_graphs and not self._rope_static():
            self.cuda_graphs = False
            FALLBACKS.note("generation-rope-regime",
                           f"generation: RoPE '{self.spec.rope.kind}' changes its frequencies with the sequence "
                           f"length within max_seq_len {max_seq_len}, so decode steps run eagerly (no CUDA graphs)")
        # NF4 projections run the fused NF4 matmul in decode steps of at most NF4_MATMUL_MAX_ROWS slots
        self._nf4 = any(isinstance(m, NF4Linear) for m in model.modules())
        self.cache: StaticKVCache | None = None
        self._buf: _Buffers | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_state: tuple | None = None
        self._tables: list = []  # the RoPE tables the captured steps read: kept alive with them

    # ---- memory ------------------------------------------------------------------------------------------------

    def release(self) -> None:
        """Free the KV cache, the step buffers and the captured graphs (the next `generate` allocates them again)."""
        self._graphs.clear()
        self._graph_state = None
        self._tables = []
        self.cache = None
        self.projections = None
        self._buf = None

    def _allocate(self) -> None:
        if self.cache is not None:
            return
        S, dev = self.max_batch_size, self.device
        self.cache = StaticKVCache(self.spec, S, self.max_seq_len, self.dtype, dev, fused=self.fused)
        self._buf = _Buffers(
            tokens=torch.zeros(S, dtype=torch.long, device=dev),
            lengths=torch.ones(S, dtype=torch.int32, device=dev),
            finished=torch.ones(S, dtype=torch.bool, device=dev),
            rows=torch.zeros(S, dtype=torch.long, device=dev),
            out=torch.zeros(S, 0, dtype=torch.long, device=dev),
            step=torch.zeros((), dtype=torch.long, device=dev),
            seed=torch.zeros((), dtype=torch.long, device=dev),
            temperature=torch.ones((), dtype=torch.float32, device=dev),
            top_p=torch.ones((), dtype=torch.float32, device=dev),
            min_p=torch.zeros((), dtype=torch.float32, device=dev),
            stop_ids=torch.full((16,), -1, dtype=torch.long, device=dev))  # padded with -1 (matches nothing)
        self._allocate_projections()

    def _allocate_projections(self) -> None:
        if not self.projection_groups and self.gemv == "cublas":
            return
        from ..train.memory import GiB, free_device_bytes  # late: the train package is heavy

        need = fused_projection_bytes(self.model, self.projection_groups)
        free = free_device_bytes(self.device)
        # the copies are a speed-up: they must not take the room the prefill's activations need
        # (the 2 GiB kept free is the memory planner's usual reserve)
        if free is not None and need + 2 * GiB > free:
            self._no_room_for_projections(f"{need / GiB:.1f} GiB needed, {free / GiB:.1f} GiB free")
            return
        try:
            self.projections = FusedProjections(self.model, self.projection_groups, self.gemv)
        except torch.OutOfMemoryError:
            self.projections = None
            self._no_room_for_projections("out of memory allocating them")

    def _no_room_for_projections(self, why: str) -> None:
        FALLBACKS.note("generation-fused-projections-memory",
                       f"generation: no room for the concatenated q/k/v and gate/up weights beside the KV cache "
                       f"({why}, 2 GiB kept free), so every projection runs on its own (slower decode steps; "
                       "Generator(fuse_projections=False) skips them up front)")

    def _rope_static(self) -> bool:
        """Whether the RoPE frequencies are the same for every length up to max_seq_len (a captured step bakes in
        one table): not for dynamic NTK past the trained length, nor long-RoPE past its original context."""
        for rope in (self.spec.rope, self.spec.local_rope):
            if rope is None:
                continue
            if rope.kind == "dynamic" and self.max_seq_len > self.spec.max_position_embeddings:
                return False
            if rope.kind == "longrope" and self.max_seq_len > (rope.original_max_position_embeddings or 0):
                return False
        return True

    # ---- the public call ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None, num_samples: int = 1,
                 merge_lora: bool = False, prompt_indices: list[int] | None = None) -> list[list[list[int]]]:
        """For each prompt, `num_samples` completions: the generated token ids only, ending with the stop token
        when one was drawn (or cut after the token that completed a stop string). `merge_lora`: merge frozen LoRA
        adapters into the dense base weights for this call (restored exactly after). `prompt_indices`: each
        prompt's index for the sampler (default 0, 1, ...): sample j of a prompt with index i draws from
        (seed, i * num_samples + j, step), so prompts of one batch split over several calls or processes (data
        parallel rollouts) draw what one call over the whole batch would, given their indices in it."""
        params = params or SamplingParams()
        prompts = [list(map(int, p)) for p in prompts]
        self._check(prompts, params, num_samples)
        if prompt_indices is None:
            prompt_indices = list(range(len(prompts)))
        elif len(prompt_indices) != len(prompts) or any(int(i) < 0 for i in prompt_indices):
            raise ValueError(f"prompt_indices must hold one index >= 0 per prompt ({len(prompts)}), got "
                             f"{len(prompt_indices)} entries")
        if not prompts:
            return []
        stop_ids = sorted(set(self.spec.eos_ids if params.stop_token_ids is None else map(int, params.stop_token_ids)))
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        was_training = self.model.training
        self.model.eval()
        try:
            self._allocate()
            projections = self.projections
            # a merge writes the concatenated copies' merged weights itself (no base weight round trip for those)
            elsewhere = projections.adapted_members() if projections is not None and merge_lora else []
            with merged_lora(self.model, merge_lora, elsewhere):
                if projections is not None:
                    projections.refresh(elsewhere)  # the weights as they are now (an optimiser step, in place)
                if self.cuda_graphs:
                    state = self._model_state()
                    if state != self._graph_state:  # weights moved, adapters switched or merged: the graphs
                        self._drop_graphs()  # read the old ones
                        self._graph_state = state
                with projections.installed() if projections is not None else contextlib.nullcontext():
                    results: list[list[list[int]]] = []
                    per_round = max(1, self.max_batch_size // num_samples)
                    for start in range(0, len(prompts), per_round):
                        chunk = prompts[start:start + per_round]
                        results += self._round(chunk, prompt_indices[start:start + per_round], params,
                                               num_samples, stop_ids, seed)
                    return results
        finally:
            self.model.train(was_training)

    def _check(self, prompts: list[list[int]], params: SamplingParams, num_samples: int) -> None:
        if num_samples < 1 or num_samples > self.max_batch_size:
            raise ValueError(f"num_samples must be in [1, max_batch_size={self.max_batch_size}], got {num_samples}")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer= to the Generator")
        V = self.spec.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
            if len(p) + params.max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} it "
                                 f"needs {len(p) + params.max_new_tokens} positions, max_seq_len is "
                                 f"{self.max_seq_len}: raise max_seq_len or shorten the prompt")
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"prompt {i} has a token id outside the vocabulary [0, {V})")

    # ---- one round: prefill, then decode ----------------------------------------------------------------------

    def _round(self, prompts: list[list[int]], indices: list[int], params: SamplingParams, G: int,
               stop_ids: list[int], seed: int) -> list[list[list[int]]]:
        b, dev = self._buf, self.device
        n = len(prompts) * G
        S = min(self.max_batch_size, _pow2_at_least(n))
        if self._nf4 and S > NF4_MATMUL_MAX_ROWS and dev.type == "cuda":
            FALLBACKS.note("generation-nf4-rows",
                           f"generation: decode steps over {S} slots exceed the fused NF4 matmul's "
                           f"{NF4_MATMUL_MAX_ROWS} rows (kernels/nf4_matmul.py), so every NF4 projection dequantises "
                           f"its whole weight and runs a GEMM at each step; rounds of at most {NF4_MATMUL_MAX_ROWS} "
                           "sequences (max_batch_size) keep the fused kernel")
        max_new = params.max_new_tokens
        if b.out.shape[1] < max_new:
            b.out = torch.zeros(self.max_batch_size, max_new, dtype=torch.long, device=dev)
            self._drop_graphs()  # they wrote into the old output buffer
        if b.stop_ids.shape[0] < len(stop_ids):
            b.stop_ids = torch.full((_pow2_at_least(len(stop_ids)),), -1, dtype=torch.long, device=dev)
            self._drop_graphs()  # they compared with the old buffer
        stops = torch.full((b.stop_ids.shape[0],), -1, dtype=torch.long)
        stops[:len(stop_ids)] = torch.tensor(stop_ids, dtype=torch.long)
        b.stop_ids.copy_(stops)
        b.seed.fill_(seed % (1 << 63))
        b.temperature.fill_(params.temperature if params.temperature > 0 else 1.0)
        b.top_p.fill_(params.top_p)
        b.min_p.fill_(params.min_p)
        rows = torch.arange(S, dtype=torch.long) + indices[0] * G  # slots past n: finished, their draws unused
        rows[:n] = torch.tensor([i * G + j for i in indices for j in range(G)], dtype=torch.long)
        b.rows[:S].copy_(rows)
        greedy, filters = params.greedy, params.filters(self.spec.vocab_size)

        first = self._prefill(prompts, G, greedy, filters)
        lengths = torch.ones(S, dtype=torch.int32)
        lengths[:n] = torch.tensor([len(p) + 1 for p in prompts for _ in range(G)], dtype=torch.int32)
        b.lengths[:S].copy_(lengths)
        b.tokens[:S].zero_()
        b.tokens[:n].copy_(first)
        b.out[:S, :1].zero_()
        b.out[:n, 0].copy_(first)
        b.finished[:S].fill_(True)
        b.finished[:n].copy_(self._is_stop(first))
        b.step.fill_(1)

        longest = max(len(p) for p in prompts)
        done = _DoneFlag(b.finished[:S], dev)
        stop_text = _StopStrings(self.tokenizer, params.stop_strings, n) if params.stop_strings else None
        steps = 1
        while steps < max_new:
            self._step(S, greedy, filters, max_position=longest + steps - 1)
            steps += 1
            if stop_text is not None and steps % params.stop_check_interval == 0:
                hit = stop_text.check(b.out[:n, :steps].tolist())
                if hit:
                    b.finished[torch.tensor(hit, device=dev)] = True
            if steps % self.check_every == 0:
                done.record()
            if done.all_finished():
                break
        tokens = b.out[:n, :steps].tolist()
        stop_set = set(stop_ids)
        completions = []
        for r, row in enumerate(tokens):
            for i, t in enumerate(row):
                if t in stop_set:
                    row = row[: i + 1]
                    break
            if stop_text is not None:
                row = stop_text.cut(r, row)
            completions.append(row)
        return [completions[p * G:(p + 1) * G] for p in range(len(prompts))]

    def _is_stop(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens[:, None] == self._buf.stop_ids[None, :]).any(-1)

    def _prefill(self, prompts: list[list[int]], G: int, greedy: bool, filters) -> torch.Tensor:
        """Prefill every prompt into the slots of its samples (prompt p's samples in slots p*G .. p*G+G-1), in
        groups of at most `prefill_tokens` tokens; returns the first generated token of every slot (n,)."""
        firsts = []
        group: list[int] = []
        tokens = 0
        for p, prompt in enumerate(prompts):
            if group and tokens + len(prompt) > self.prefill_tokens:
                firsts.append(self._prefill_group(prompts, group, G, greedy, filters))
                group, tokens = [], 0
            group.append(p)
            tokens += len(prompt)
        firsts.append(self._prefill_group(prompts, group, G, greedy, filters))
        return torch.cat(firsts)

    def _prefill_group(self, prompts, group: list[int], G: int, greedy: bool, filters) -> torch.Tensor:
        b, dev = self._buf, self.device
        lens = [len(prompts[p]) for p in group]
        ids = torch.tensor([t for p in group for t in prompts[p]], dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in lens])
        starts = torch.tensor([0] + lens).cumsum(0)
        token_index = torch.cat([torch.arange(s, s + n).repeat(G) for s, n in zip(starts.tolist(), lens)])
        slot_index = torch.cat([torch.arange(p * G, p * G + G).repeat_interleave(n) for p, n in zip(group, lens)])
        position_index = torch.cat([torch.arange(n).repeat(G) for n in lens])
        documents = None
        if len(group) > 1:
            documents = DocumentLayout(torch.repeat_interleave(torch.arange(len(group), dtype=torch.int32),
                                                               torch.tensor(lens))[None],
                                       starts.to(torch.int32), max(lens)).to(dev)
        self.cache.begin_prefill(documents, token_index.to(dev), slot_index.to(dev), position_index.to(dev),
                                 max_position=max(lens) - 1)
        out = self.model(ids[None].to(dev), position_ids=positions[None].to(dev), cache=self.cache,
                         return_logits=False)
        last = out.last_hidden_state[0, (starts[1:] - 1).to(dev)]
        logits = self.model.logits(last).repeat_interleave(G, dim=0)
        slots = torch.tensor([p * G + j for p in group for j in range(G)], device=dev)
        return next_tokens(logits, greedy, filters, b.temperature, b.top_p, b.min_p, b.seed, b.rows[slots],
                           torch.zeros((), dtype=torch.long, device=dev))

    # ---- the decode step ----------------------------------------------------------------------------------------

    def _decode_step(self, S: int, greedy: bool, filters, max_position: int) -> None:
        """One token for each of the first S slots, all on the device, every input and output a static buffer."""
        b = self._buf
        lengths = b.lengths[:S]
        self.cache.begin_decode(lengths, max_position)
        out = self.model(b.tokens[:S, None], position_ids=(lengths.to(torch.long) - 1)[:, None], cache=self.cache,
                         return_logits=False)
        logits = self.model.logits(out.last_hidden_state[:, -1])
        nxt = next_tokens(logits, greedy, filters, b.temperature, b.top_p, b.min_p, b.seed, b.rows[:S], b.step)
        b.out[:S].index_copy_(1, b.step.view(1), nxt[:, None])
        b.finished[:S] |= self._is_stop(nxt)
        b.tokens[:S].copy_(nxt)
        lengths.add_(1)
        b.step.add_(1)

    def _step(self, S: int, greedy: bool, filters, max_position: int) -> None:
        if not self.cuda_graphs:
            self._decode_step(S, greedy, filters, max_position)
            return
        key = (S, greedy, filters)  # buffers that are reallocated (out, stop_ids) drop every graph
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._graphs[key] = self._capture(S, greedy, filters)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # an op that cannot be captured (a host sync, a pageable copy): decode eagerly
                FALLBACKS.fail("generation-cuda-graphs",
                               f"capturing the decode step failed, decoding runs eagerly (slower): "
                               f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                self.cuda_graphs = False
                self._graphs.clear()
                torch.cuda.synchronize()
                self._decode_step(S, greedy, filters, max_position)
                return
        graph.replay()

    def _capture(self, S: int, greedy: bool, filters) -> torch.cuda.CUDAGraph:
        """Warm the step up, then capture it (capturing runs nothing: the buffers stay as they are)."""
        self._warm_up(S, greedy, filters)
        # each graph its own memory pool: what one capture allocates (masks, cu_seqlens) and a later capture
        # frees must not be handed to that later capture while the first graph still reads it
        graph = torch.cuda.CUDAGraph()
        cause: Exception | None = None
        try:
            with torch.cuda.graph(graph):
                try:
                    self._decode_step(S, greedy, filters, self.max_seq_len - 1)
                except Exception as e:  # the op that broke the capture, not the capture_end error that follows
                    cause = e
                    raise
        except Exception as e:
            raise (cause or e) from None
        return graph

    def _warm_up(self, S: int, greedy: bool, filters) -> None:
        """Run the step twice eagerly (on a side stream on CUDA: Triton autotuning, cuBLAS workspaces, lazily built
        tables), then restore the buffers it advanced. Its cache writes are harmless: the first is the one the real
        step makes again, the second lies beyond every slot's length. The RoPE tables are built for max_seq_len
        first, so the captured step gathers from tables that no later call replaces."""
        b = self._buf
        if not self._tables:
            rot = [self.model.model.rotary] + ([self.model.model.local_rotary]
                                               if self.model.model.local_rotary is not None else [])
            self._tables = [r.table(self.device, self.max_seq_len) for r in rot]
        state = (b.tokens, b.lengths, b.finished, b.out, b.step)
        saved = [t.clone() for t in state]
        if self.device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode_step(S, greedy, filters, self.max_seq_len - 1)
            torch.cuda.current_stream().wait_stream(side)
        else:
            for _ in range(2):
                self._decode_step(S, greedy, filters, self.max_seq_len - 1)
        for t, s in zip(state, saved):
            t.copy_(s)

    def _drop_graphs(self) -> None:
        self._graphs.clear()

    def _model_state(self) -> tuple:
        """What a captured step depends on besides its buffers: where every weight lives and which adapters run."""
        ptrs = tuple(t.data_ptr() for t in self.model.parameters()) + tuple(
            t.data_ptr() for t in self.model.buffers())
        flags = tuple(m.disabled for _, m in lora_layers(self.model))
        fused = self.projections.data_ptrs() if self.projections is not None else ()
        return ptrs, flags, fused


class _DoneFlag:
    """Whether every row is finished, read without making the GPU wait for the host: `record()` copies the flag to
    pinned host memory asynchronously behind the queued steps and records an event; `all_finished()` reads the
    copies whose events have completed. At most `max_pending` copies are in flight: past that the host waits for
    the oldest, which bounds how many steps it queues beyond the point where every row finished. On the CPU the
    copy is immediate."""

    def __init__(self, finished: torch.Tensor, device: torch.device, max_pending: int = 2):
        self.finished, self.cuda, self.max_pending = finished, device.type == "cuda", max_pending
        self.flags = [torch.zeros((), dtype=torch.bool, pin_memory=self.cuda) for _ in range(max_pending + 2)]
        self.pending: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self.next = 0

    def record(self) -> None:
        flag = self.flags[self.next]
        self.next = (self.next + 1) % len(self.flags)
        flag.copy_(self.finished.all(), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((flag, event))

    def _wait_oldest(self) -> bool:
        flag, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
        return bool(flag)

    def all_finished(self) -> bool:
        while self.pending:
            event = self.pending[0][1]
            if event is not None and not event.query() and len(self.pending) <= self.max_pending:
                return False
            if self._wait_oldest():
                self.pending.clear()
                return True
        return False


class _StopStrings:
    """Host-side stop strings: which rows' decoded completions contain one, and where to cut them (after the
    first token whose prefix text contains a stop string)."""

    def __init__(self, tokenizer, stops: list[str], rows: int):
        self.tokenizer, self.stops = tokenizer, stops
        self.cut_at: dict[int, int] = {}  # row -> completion length that first contains a stop string

    def _contains(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        return any(s in text for s in self.stops)

    def _first_length(self, ids: list[int]) -> int | None:
        if not self._contains(ids):
            return None
        lo, hi = 1, len(ids)  # a prefix containing a stop string stays containing it as it grows: bisect
        while lo < hi:
            mid = (lo + hi) // 2
            if self._contains(ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def check(self, tokens: list[list[int]]) -> list[int]:
        """Rows newly found to contain a stop string."""
        hit = []
        for r, ids in enumerate(tokens):
            if r in self.cut_at:
                continue
            n = self._first_length(ids)
            if n is not None:
                self.cut_at[r] = n
                hit.append(r)
        return hit

    def cut(self, row: int, ids: list[int]) -> list[int]:
        n = self.cut_at.get(row)
        if n is None:
            n = self._first_length(ids)
        return ids if n is None else ids[:n]


def generate(model: CausalLM, tokenizer=None, prompts=None, *, num_samples: int = 1, max_batch_size: int = 64,
             cuda_graphs: bool = True, merge_lora: bool = False, **sampling):
    """One-shot generation. `prompts`: a string, a list of strings (needs `tokenizer`), or lists of token ids.
    `sampling`: SamplingParams fields (max_new_tokens, temperature, top_p, top_k, min_p, stop_token_ids,
    stop_strings, seed). Returns one completion per prompt (text for text prompts, else token ids), or with
    num_samples > 1 a list of num_samples per prompt; a single string prompt returns its result alone."""
    if prompts is None:
        raise TypeError("generate(model, tokenizer, prompts, ...): prompts are missing")
    single = isinstance(prompts, str)
    if single:
        prompts = [prompts]
    text = bool(prompts) and isinstance(prompts[0], str)
    if text:
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (or pass lists of token ids)")
        ids = [tokenizer(p)["input_ids"] for p in prompts]
    else:
        ids = [list(p) for p in prompts]
    params = SamplingParams(**sampling)
    if params.stop_token_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
        params.stop_token_ids = sorted(set(model.spec.eos_ids) | {tokenizer.eos_token_id})
    longest = max((len(p) for p in ids), default=1)
    gen = Generator(model, max_batch_size=max(num_samples, min(max_batch_size, len(ids) * num_samples)),
                    max_seq_len=longest + params.max_new_tokens, tokenizer=tokenizer, cuda_graphs=cuda_graphs)
    out = gen.generate(ids, params, num_samples=num_samples, merge_lora=merge_lora)
    gen.release()
    if text:
        out = [[tokenizer.decode(c, skip_special_tokens=True) for c in samples] for samples in out]
    if num_samples == 1:
        out = [samples[0] for samples in out]
    return out[0] if single else out
