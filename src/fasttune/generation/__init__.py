"""Fast batched generation on the training model: a static per-slot KV cache, packed prefill, CUDA-graph decode
steps, sampling (temperature, top-k, top-p, min-p, stop tokens and strings), several samples per prompt sharing
one prefill, LoRA unmerged or merged for a rollout.

    from fasttune.generation import Generator, SamplingParams
    gen = Generator(model, max_batch_size=64, max_seq_len=2048, tokenizer=tok)
    out = gen.generate(prompt_ids, SamplingParams(max_new_tokens=256, temperature=0.8), num_samples=8)
"""
from .cache import StaticKVCache, kv_cache_bytes
from .fused import fused_projection_bytes
from .generator import Generator, generate
from .merge import merged_lora
from .sampling import SamplingParams, filter_logits

__all__ = ["Generator", "SamplingParams", "StaticKVCache", "filter_logits", "fused_projection_bytes", "generate",
           "kv_cache_bytes", "merged_lora"]
